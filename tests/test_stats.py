"""Run stats: StatsService.GetStats and `agentd stats` over the trace archive.

Over a real server on loopback (API keys for three tenants), 1,000 ended runs of three agents are
written straight into the server's trace archive (SQLite, Postgres) or memory trace store, as the
run loop records them: a run span with the stats attributes (error code, time to first token,
cost, unpriced calls, cached and reasoning tokens), an agent span, model calls with tokens, tool
calls (some failing, one made up by the model), with failures, cancellations, varied durations
and start times over several hours. What GetStats answers (success rates, nearest-rank
percentiles, error breakdowns, tokens, costs, tool error rates, time buckets, pages) and what
`agentd stats` prints are checked against a computation here, on every backend; another
tenant's runs never count, versions group apart, a window leaves runs out, and bad requests are
INVALID_ARGUMENT naming the field. GetStats' latency is printed (run with -s), never asserted.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import statistics
import time
from collections import Counter, defaultdict
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from rich.cells import cell_len

from agentd.client import AgentdClient
from agentd.server import Script, call, calls, say
from agentd.server.auth.api_keys import create_key
from agentd.server.runtime.events import RunErrorCode
from agentd.server.tracing.base import SpanKind
from agentd.server.tracing.memory import SpanRecord, TraceRecord
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import run_event_pb2
from agentd.v1 import stats_service_pb2 as pb
from agentd.v1 import stats_service_pb2_grpc as pb_grpc
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.conftest import Harness, start_harness
from tests.runs_util import collect
from tests.test_cli import agentd
from tests.test_error_details import details_of

S = 1_000_000_000
MINUTE, HOUR, DAY = 60 * S, 3600 * S, 86400 * S
BUCKETS = {pb.TIME_BUCKET_MINUTE: MINUTE, pb.TIME_BUCKET_HOUR: HOUR, pb.TIME_BUCKET_DAY: DAY}
# Agents, the versions their runs start with, their tools, and how they fail.
AGENTS = {
    "triage": {"versions": (1, 2), "tools": ("lookup_order", "search_kb"), "fail": 0.10, "cancel": 0.04},
    "billing": {"versions": (0,), "tools": ("lookup_order", "issue_refund"), "fail": 0.25, "cancel": 0.02},
    "research": {"versions": (3, 4), "tools": ("web_search", "fetch_page", "summarise"), "fail": 0.06, "cancel": 0.08},
}
TOOL_ERROR_RATE = {"lookup_order": 0.05, "search_kb": 0.0, "issue_refund": 0.15, "web_search": 0.1,
                   "fetch_page": 0.3, "summarise": 0.02, "no_such_tool": 1.0}
# Error codes as the run loop may set them: the enum, its value, or one the contract does not
# know (it counts as UNSPECIFIED, as a failure without a code does).
CODES = [(RunErrorCode.MODEL_ERROR, 5), ("max_turns_exceeded", 3), (RunErrorCode.MODEL_UNAVAILABLE, 2),
         ("guardrail_tripped", 2), (None, 1), ("quota_exceeded", 1)]
RUNS = 1000
TENANT, OTHER, NOBODY = "acme", "globex", "initech"


@dataclass
class Run:
    """A run as the test knows it (the truth the stats are checked against) and its trace."""

    tenant: str
    agent: str
    version: int
    start_ns: int
    end_ns: int
    outcome: str
    code: Any
    ttft_ms: float | None
    cost_nanos: int | None
    unpriced_calls: int
    cached: int
    reasoning: int
    generations: list[tuple[int, int]]
    tools: list[tuple[str, bool, int]]
    trace: TraceRecord = field(init=False)

    @property
    def input_tokens(self) -> int:
        return sum(i for i, _ in self.generations)

    @property
    def output_tokens(self) -> int:
        return sum(o for _, o in self.generations)


def _hex(rng: random.Random, nbytes: int) -> str:
    return "".join(f"{rng.randrange(256):02x}" for _ in range(nbytes))


def make_run(rng: random.Random, tenant: str, agent: str, start_ns: int) -> Run:
    spec = AGENTS[agent]
    roll = rng.random()
    outcome = "failed" if roll < spec["fail"] else "cancelled" if roll < spec["fail"] + spec["cancel"] else "completed"
    code = rng.choices([c for c, _ in CODES], [w for _, w in CODES])[0] if outcome == "failed" else None
    # Durations: mostly hundreds of ms to a few s, a long tail; research is slower.
    scale = {"triage": 400, "billing": 250, "research": 2500}[agent]
    duration_ns = int(rng.lognormvariate(0, 0.9) * scale * 1_000_000) + rng.randrange(1000)
    got_token = outcome == "completed" or rng.random() < 0.5
    ttft_ms = rng.randrange(20_000, min(duration_ns // 1000, 5_000_000) + 20_001) / 1000 if got_token else None
    priced = rng.random()
    cost_nanos = rng.randrange(1, 50_000_000) if priced < 0.85 else None
    unpriced = 0 if priced < 0.7 else rng.randrange(1, 3)
    generations = [(rng.randrange(50, 4000), rng.randrange(5, 800)) for _ in range(rng.randrange(1, 4))]
    tools = []
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        tool = rng.choice(spec["tools"]) if rng.random() > 0.02 else "no_such_tool"
        tools.append((tool, rng.random() < TOOL_ERROR_RATE[tool], rng.randrange(100_000, 900_000_000)))
    run = Run(tenant, agent, rng.choice(spec["versions"]), start_ns, start_ns + duration_ns, outcome, code, ttft_ms,
              cost_nanos, unpriced, rng.randrange(0, 300), rng.randrange(0, 200), generations, tools)
    run.trace = _trace(rng, run)
    return run


def _trace(rng: random.Random, run: Run) -> TraceRecord:
    error = {"completed": "", "cancelled": "cancelled: the client went away",
             "failed": "model error: the endpoint answered 500"}[run.outcome]
    trace = TraceRecord(
        trace_id=_hex(rng, 16), run_id=f"run_{_hex(rng, 8)}", workflow_name="agentd run", group_id="", metadata={},
        agent=run.agent, start_ns=run.start_ns, end_ns=run.end_ns, error=error, tenant=run.tenant,
        agent_version=run.version, capture_content=False,
    )
    attributes: dict[str, Any] = {"run_id": trace.run_id, "agent": run.agent, "agent_version": run.version,
                                  "turns": len(run.generations), "input_tokens": run.input_tokens,
                                  "output_tokens": run.output_tokens, "unpriced_calls": run.unpriced_calls,
                                  "cached_input_tokens": run.cached, "reasoning_tokens": run.reasoning}
    if run.code is not None:
        attributes["error_code"] = run.code
    if run.ttft_ms is not None:
        attributes["ttft_ms"] = run.ttft_ms
    if run.cost_nanos is not None:  # as a Decimal, a float or text: whichever the run loop sends
        amount = Decimal(run.cost_nanos) / Decimal(S)
        attributes["cost_usd"] = rng.choice([amount, float(amount), str(amount)])
    root = SpanRecord(trace.trace_id, _hex(rng, 8), "", SpanKind.RUN, "agentd run", run.start_ns, run.end_ns, error,
                      attributes)
    segment = SpanRecord(trace.trace_id, _hex(rng, 8), root.span_id, SpanKind.AGENT, run.agent, run.start_ns + 1,
                         run.end_ns, error, {"agent": run.agent})
    trace.spans = [root, segment]
    at = run.start_ns + 2
    for input_tokens, output_tokens in run.generations:
        trace.spans.append(SpanRecord(
            trace.trace_id, _hex(rng, 8), segment.span_id, SpanKind.GENERATION, "gpt-test", at, at + 1000, "",
            {"model": "gpt-test", "agent": run.agent, "finish_reason": "stop", "input_tokens": input_tokens,
             "output_tokens": output_tokens},
        ))
    for tool, failed, took in run.tools:
        trace.spans.append(SpanRecord(
            trace.trace_id, _hex(rng, 8), segment.span_id, SpanKind.FUNCTION, tool, at, at + took,
            f"Error: tool {tool!r} failed: ValueError" if failed else "", {"tool_name": tool, "call_id": _hex(rng, 4)},
        ))
    return trace


def make_runs(now_ns: int) -> list[Run]:
    """1,000 runs of the tenant over the 7 hours before ``now_ns``, 60 more a day before that, and
    40 of another tenant (with the same agent names) in the window."""
    rng = random.Random(16)
    agents = list(AGENTS)
    runs = [make_run(rng, TENANT, rng.choices(agents, [5, 3, 2])[0], now_ns - rng.randrange(5 * MINUTE, 7 * HOUR))
            for _ in range(RUNS)]
    runs += [make_run(rng, TENANT, rng.choice(agents), now_ns - rng.randrange(26 * HOUR, 30 * HOUR)) for _ in range(60)]
    runs += [make_run(rng, OTHER, "triage", now_ns - rng.randrange(5 * MINUTE, 7 * HOUR)) for _ in range(40)]
    return runs


# --- the expected answers, computed here ------------------------------------------------------------


def nearest_rank(values: list[int]) -> tuple[int, ...]:
    """(count, p50, p95, p99): the value ranked ceil(p/100 * n), counting from 1, in ascending order."""
    ordered = sorted(values)
    if not ordered:
        return (0,)
    return (len(ordered), *(ordered[math.ceil(Fraction(p, 100) * len(ordered)) - 1] for p in (50, 95, 99)))


def code_number(code: Any) -> int:
    if code is None:
        return 0
    name = "RUN_ERROR_CODE_" + (code.value if isinstance(code, RunErrorCode) else code).upper()
    return run_event_pb2.RunErrorCode.Value(name) if name in run_event_pb2.RunErrorCode.keys() else 0


def expected_figures(runs: list[Run]) -> dict[str, Any]:
    completed = sum(r.outcome == "completed" for r in runs)
    failed = [r for r in runs if r.outcome == "failed"]
    tool_calls = [t for r in runs for t in r.tools]
    tool_errors = sum(failed_call for _, failed_call, _ in tool_calls)
    cost = sum(r.cost_nanos or 0 for r in runs)
    return {
        "runs": len(runs), "completed": completed, "failed": len(failed),
        "cancelled": sum(r.outcome == "cancelled" for r in runs), "success_rate": completed / len(runs),
        "errors": dict(Counter(code_number(r.code) for r in failed)),
        "duration": nearest_rank([r.end_ns - r.start_ns for r in runs]),
        "ttft": nearest_rank([round(r.ttft_ms * 1_000_000) for r in runs if r.ttft_ms is not None]),
        "tokens": (sum(r.input_tokens for r in runs), sum(r.output_tokens for r in runs),
                   sum(r.cached for r in runs), sum(r.reasoning for r in runs)),
        "cost": ("USD", cost // S, cost % S), "unpriced_runs": sum(r.unpriced_calls > 0 for r in runs),
        "tool_calls": len(tool_calls), "tool_errors": tool_errors,
        "tool_error_rate": tool_errors / len(tool_calls) if tool_calls else 0.0,
    }


def expected_stats(runs: list[Run], tenant: str, start_ns: int, end_ns: int, bucket: int = pb.TIME_BUCKET_HOUR,
                   agent: str = "", version: int | None = None, by_version: bool = False) -> list[dict[str, Any]]:
    width = BUCKETS[bucket]
    chosen = [r for r in runs if r.tenant == tenant and start_ns <= r.start_ns < end_ns
              and (not agent or r.agent == agent) and (version is None or r.version == version)]
    groups: dict[tuple[str, int | None], list[Run]] = defaultdict(list)
    for run in chosen:
        groups[(run.agent, run.version if by_version else None)].append(run)
    answer = []
    for (name, group_version), members in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        buckets: dict[int, list[Run]] = defaultdict(list)
        tools: dict[str, list[tuple[str, bool, int]]] = defaultdict(list)
        for run in members:
            buckets[run.start_ns // width * width].append(run)
            for made in run.tools:
                tools[made[0]].append(made)
        tool_rows = sorted(
            ((tool, len(made), sum(m[1] for m in made), sum(m[1] for m in made) / len(made),
              nearest_rank([m[2] for m in made])) for tool, made in tools.items()),
            key=lambda row: (-row[1], row[0]),
        )
        answer.append({
            "agent": f"agents/{name}", "version": group_version, "totals": expected_figures(members),
            "buckets": {start: expected_figures(bucket_runs) for start, bucket_runs in sorted(buckets.items())},
            "tools": tool_rows, "omitted_tools": 0,
        })
    return answer


def _percentiles(message: pb.DurationPercentiles) -> tuple[int, ...]:
    if not message.count:
        assert not (message.HasField("p50") or message.HasField("p95") or message.HasField("p99"))
        return (0,)
    return (message.count, message.p50.ToNanoseconds(), message.p95.ToNanoseconds(), message.p99.ToNanoseconds())


def figures_of(stats: pb.RunStats) -> dict[str, Any]:
    errors = {e.code: e.runs for e in stats.errors}
    assert len(errors) == len(stats.errors)  # one entry per code
    assert [e.runs for e in stats.errors] == sorted((e.runs for e in stats.errors), reverse=True)  # most first
    assert sum(errors.values()) == stats.failed_runs
    return {
        "runs": stats.runs, "completed": stats.completed_runs, "failed": stats.failed_runs,
        "cancelled": stats.cancelled_runs, "success_rate": stats.success_rate, "errors": errors,
        "duration": _percentiles(stats.duration), "ttft": _percentiles(stats.time_to_first_token),
        "tokens": (stats.input_tokens, stats.output_tokens, stats.cached_input_tokens, stats.reasoning_tokens),
        "cost": (stats.cost.currency_code, stats.cost.units, stats.cost.nanos), "unpriced_runs": stats.unpriced_runs,
        "tool_calls": stats.tool_calls, "tool_errors": stats.tool_errors, "tool_error_rate": stats.tool_error_rate,
    }


def groups_of(groups: Any) -> list[dict[str, Any]]:
    return [{
        "agent": g.agent, "version": g.agent_version if g.HasField("agent_version") else None,
        "totals": figures_of(g.totals),
        "buckets": {b.start_time.ToNanoseconds(): figures_of(b.stats) for b in g.buckets},
        "tools": [(t.tool, t.calls, t.errors, t.error_rate, _percentiles(t.duration)) for t in g.tools],
        "omitted_tools": g.omitted_tools,
    } for g in groups]


# --- the server, its tenants and the archived runs ---------------------------------------------------


@dataclass
class Stats:
    """A server whose trace store holds ``runs``, and a GetStats stub per tenant."""

    harness: Harness
    backend: str
    runs: list[Run]
    now_ns: int
    keys: dict[str, str]
    clients: dict[str, AgentdClient]

    def stub(self, tenant: str = TENANT) -> pb_grpc.StatsServiceStub:
        return pb_grpc.StatsServiceStub(self.clients[tenant]._channel)

    async def get(self, tenant: str = TENANT, **fields: Any) -> pb.GetStatsResponse:
        return await self.stub(tenant).GetStats(pb.GetStatsRequest(**fields), timeout=30)

    async def all_groups(self, tenant: str = TENANT, **fields: Any) -> tuple[list[pb.AgentStats], int]:
        """Every group, page after page; and how many pages that took."""
        groups, token, pages = [], "", 0
        while True:
            page = await self.get(tenant, page_token=token, **fields)
            groups += list(page.groups)
            pages += 1
            token = page.next_page_token
            if not token:
                return groups, pages


def window(now_ns: int, start_ns: int, end_ns: int | None = None) -> dict[str, Any]:
    from google.protobuf.timestamp_pb2 import Timestamp

    start = Timestamp()
    start.FromNanoseconds(start_ns)
    end = Timestamp()
    end.FromNanoseconds(now_ns if end_ns is None else end_ns)
    return {"start_time": start, "end_time": end}


@asynccontextmanager
async def backend_settings(backend: str) -> AsyncIterator[dict[str, object]]:
    if backend == "sqlite":
        yield {}
    elif backend == "memory":
        yield {"trace_store": "memory"}
    else:
        schema = new_schema()
        async with dropped_afterwards(schema):
            yield {"store": "postgres", "postgres_url": POSTGRES_URL, "postgres_schema": schema}


async def store_runs(harness: Harness, runs: list[Run]) -> None:
    """Into the archive, as the trace store's writer hands ended traces over (in batches); or, with
    the memory trace store, into memory as ended traces."""
    traces = harness.server.traces
    if traces.archive is not None:
        for first in range(0, len(runs), 200):
            await traces.archive.write([run.trace for run in runs[first:first + 200]])
        return
    memory = traces.memory
    for run in runs:
        held = memory.start_trace(run_id=run.trace.run_id, workflow_name="agentd run", group_id="", metadata={},
                                  agent=run.agent, tenant=run.tenant, trace_id=run.trace.trace_id,
                                  agent_version=run.version)
        for name in ("start_ns", "end_ns", "error", "spans"):
            setattr(held, name, getattr(run.trace, name))


@asynccontextmanager
async def stats_server(model_server: ScriptedOpenAIServer, tmp_path: Path, backend: str,
                       runs: list[Run] | None = None) -> AsyncIterator[Stats]:
    keys_file = tmp_path / "keys.json"
    keys = {tenant: create_key(keys_file, tenant=tenant, subject=f"ops@{tenant}", scopes=["traces:read"])[1]
            for tenant in (TENANT, OTHER, NOBODY)}
    keys["runs-only"] = create_key(keys_file, tenant=TENANT, subject="runner", scopes=["runs:read", "runs:write",
                                                                                      "agents:read"])[1]
    now_ns = time.time_ns()
    runs = make_runs(now_ns) if runs is None else runs
    async with backend_settings(backend) as settings:
        harness = await start_harness(model_server, tmp_path, api_keys_file=keys_file, trace_flush_interval_s=60,
                                      **settings)
        clients = {name: AgentdClient(harness.target, token=key) for name, key in keys.items()}
        try:
            await store_runs(harness, runs)
            yield Stats(harness, backend, runs, now_ns, keys, clients)
        finally:
            for client in clients.values():
                await client.close()
            await harness.client.close()
            await harness.server.stop(grace_s=0)


BACKENDS = ["sqlite", "postgres", "memory"]


@pytest.fixture(params=BACKENDS)
async def stats(request, model_server, tmp_path) -> AsyncIterator[Stats]:
    async with stats_server(model_server, tmp_path, request.param) as found:
        yield found


# --- GetStats -----------------------------------------------------------------------------------------


async def test_stats_match_a_computation_over_1000_runs(stats: Stats):
    now = stats.now_ns
    # The default window: the last 24 hours, by agent, hourly buckets.
    response = await stats.get()
    assert response.bucket == pb.TIME_BUCKET_HOUR and not response.next_page_token
    start, end = response.start_time.ToNanoseconds(), response.end_time.ToNanoseconds()
    assert end - start == DAY and now <= end <= time.time_ns()
    expected = expected_stats(stats.runs, TENANT, start, end)
    assert sum(group["totals"]["runs"] for group in expected) == RUNS  # the old runs are out, the other tenant's too
    assert [g.agent for g in response.groups] == ["agents/billing", "agents/research", "agents/triage"]
    assert groups_of(response.groups) == expected
    # Failures were injected: every agent has some, with several codes, and failing tools.
    for group in response.groups:
        totals = group.totals
        assert 0 < totals.success_rate < 1 and totals.failed_runs and len(totals.errors) >= 3
        assert totals.cancelled_runs and totals.unpriced_runs and totals.tool_errors
        assert totals.duration.p50.ToNanoseconds() <= totals.duration.p95.ToNanoseconds() \
            <= totals.duration.p99.ToNanoseconds()
        assert 0 < totals.time_to_first_token.count < totals.runs
        assert len(group.buckets) >= 7 and sum(b.stats.runs for b in group.buckets) == totals.runs
    codes = {e.code for g in response.groups for e in g.totals.errors}
    assert run_event_pb2.RUN_ERROR_CODE_UNSPECIFIED in codes and run_event_pb2.RUN_ERROR_CODE_MODEL_ERROR in codes

    # Minute buckets, by version, one agent, an explicit window; and day buckets over two days.
    fields = window(now, now - 7 * HOUR)
    response = await stats.get(bucket=pb.TIME_BUCKET_MINUTE, agent="agents/research", group_by_agent_version=True,
                               **fields)
    assert [(g.agent, g.agent_version) for g in response.groups] == [("agents/research", 3), ("agents/research", 4)]
    assert groups_of(response.groups) == expected_stats(stats.runs, TENANT, now - 7 * HOUR, now, pb.TIME_BUCKET_MINUTE,
                                                        agent="research", by_version=True)
    response = await stats.get(bucket=pb.TIME_BUCKET_DAY, **window(now, now - 2 * DAY))
    assert groups_of(response.groups) == expected_stats(stats.runs, TENANT, now - 2 * DAY, now, pb.TIME_BUCKET_DAY)
    assert sum(g.totals.runs for g in response.groups) == RUNS + 60  # the day-old runs count now


async def test_versions_group_apart_and_filter(stats: Stats):
    now = stats.now_ns
    fields = window(now, now - DAY)
    response = await stats.get(group_by_agent_version=True, **fields)
    assert [(g.agent, g.agent_version) for g in response.groups] == [
        ("agents/billing", 0), ("agents/research", 3), ("agents/research", 4), ("agents/triage", 1),
        ("agents/triage", 2)]
    assert groups_of(response.groups) == expected_stats(stats.runs, TENANT, now - DAY, now, by_version=True)
    by_agent = {g.agent: g.totals.runs for g in (await stats.get(**fields)).groups}
    assert by_agent["agents/triage"] == sum(g.totals.runs for g in response.groups if g.agent == "agents/triage")
    # One version (0 is a version like any other), with or without grouping by it.
    for version, agent in ((2, "triage"), (0, "billing")):
        only = await stats.get(agent_version=version, **fields)
        assert [g.agent for g in only.groups] == [f"agents/{agent}"] and not only.groups[0].HasField("agent_version")
        assert groups_of(only.groups) == expected_stats(stats.runs, TENANT, now - DAY, now, version=version)


async def test_a_tenant_sees_only_its_own_runs(stats: Stats):
    now = stats.now_ns
    fields = window(now, now - DAY)
    other = await stats.get(OTHER, **fields)
    assert [g.agent for g in other.groups] == ["agents/triage"] and other.groups[0].totals.runs == 40
    assert groups_of(other.groups) == expected_stats(stats.runs, OTHER, now - DAY, now)
    mine = await stats.get(TENANT, agent="triage", **fields)
    assert groups_of(mine.groups) == expected_stats(stats.runs, TENANT, now - DAY, now, agent="triage")
    nobody = await stats.get(NOBODY, **window(now, now - 7 * DAY))
    assert list(nobody.groups) == [] and not nobody.next_page_token
    # The scope: traces:read.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stats.get("runs-only")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details_of(denied.value)["ErrorInfo"].metadata["required_scope"] == "traces:read"  # type: ignore[attr-defined]


async def test_a_window_leaves_runs_out(stats: Stats):
    now = stats.now_ns
    for start, end in ((now - 3 * HOUR, now - HOUR), (now - 29 * HOUR, now - 25 * HOUR), (now - 90 * MINUTE, now)):
        response = await stats.get(bucket=pb.TIME_BUCKET_MINUTE if end - start <= 4 * HOUR else pb.TIME_BUCKET_HOUR,
                                   **window(now, start, end))
        width = BUCKETS[response.bucket]
        expected = expected_stats(stats.runs, TENANT, start, end, response.bucket)
        assert groups_of(response.groups) == expected
        inside = [r for r in stats.runs if r.tenant == TENANT and start <= r.start_ns < end]
        assert 0 < sum(g.totals.runs for g in response.groups) == len(inside) < RUNS
        for group in response.groups:
            for bucket in group.buckets:
                assert start // width * width <= bucket.start_time.ToNanoseconds() < end
    # Before any run, or ending where the first run starts (the end is exclusive): nothing.
    first = min(r.start_ns for r in stats.runs)
    assert list((await stats.get(**window(now, first - 3 * HOUR, first))).groups) == []
    assert sum(g.totals.runs for g in (await stats.get(**window(now, first - HOUR, first + 1))).groups) == 1


async def test_groups_come_in_pages(stats: Stats):
    now = stats.now_ns
    fields = {"group_by_agent_version": True, **window(now, now - DAY)}
    whole = await stats.get(**fields)
    paged, pages = await stats.all_groups(page_size=2, **fields)
    assert pages == 3 and groups_of(paged) == groups_of(whole.groups)
    one, pages = await stats.all_groups(page_size=1, agent="research", **fields)
    assert pages == 2 and groups_of(one) == groups_of([g for g in whole.groups if g.agent == "agents/research"])
    # A window left to its default keeps the first page's on the later pages.
    first = await stats.get(page_size=1)
    later = await stats.get(page_size=1, page_token=first.next_page_token)
    assert (later.start_time, later.end_time) == (first.start_time, first.end_time)
    assert [g.agent for g in (first.groups[0], later.groups[0])] == ["agents/billing", "agents/research"]


async def test_latency_over_1000_runs_is_printed(stats: Stats):
    """GetStats over the 1,000 runs (three agents, hourly buckets), end to end through the client:
    printed, never asserted (machines differ)."""
    timings = []
    for _ in range(15):
        started = time.perf_counter()
        response = await stats.get()
        timings.append((time.perf_counter() - started) * 1000)
    assert sum(g.totals.runs for g in response.groups) == RUNS
    print(f"\nGetStats over {RUNS} runs ({stats.backend}): median {statistics.median(timings[3:]):.1f} ms,"
          f" max {max(timings[3:]):.1f} ms (first {timings[0]:.1f} ms)")


# --- bad requests -----------------------------------------------------------------------------------------


async def _invalid(stats: Stats, **fields: Any) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stats.get(**fields)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failure.value
    details = details_of(failure.value)
    assert details["ErrorInfo"].reason == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    violations = details["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert len(violations) == 1 and details["ErrorInfo"].metadata["field"] == violations[0].field  # type: ignore[attr-defined]
    return violations[0].field, violations[0].description


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_bad_requests_name_the_field(model_server, tmp_path, backend):
    async with stats_server(model_server, tmp_path, backend, runs=[]) as stats:
        now = stats.now_ns
        field_, why = await _invalid(stats, **window(now, now, now - HOUR))
        assert field_ == "end_time" and "later than start_time" in why
        field_, _ = await _invalid(stats, **window(now, now - HOUR, now - HOUR))
        assert field_ == "end_time"
        future = window(now, now + HOUR)
        field_, why = await _invalid(stats, start_time=future["start_time"])  # end_time unset: now
        assert field_ == "start_time" and "past" in why
        field_, why = await _invalid(stats, bucket=7)
        assert field_ == "bucket" and "TIME_BUCKET_MINUTE" in why
        field_, why = await _invalid(stats, bucket=pb.TIME_BUCKET_MINUTE, **window(now, now - 2 * DAY))
        assert field_ == "bucket" and "minute buckets; the limit is 1500" in why
        for size in (-1, 101, 10_000):
            field_, why = await _invalid(stats, page_size=size)
            assert field_ == "page_size" and "between 0 and 100" in why
        for token in ("garbage", "c3RhdHN8eHh4fDE6Mjox"):
            assert (await _invalid(stats, page_token=token))[0] == "page_token"
        for agent in ("sessions/x", "agents/", "agents/a/b", "bad\x01agent"):
            assert (await _invalid(stats, agent=agent))[0] == "agent"
        assert (await _invalid(stats, agent_version=-1))[0] == "agent_version"
        from google.protobuf.timestamp_pb2 import Timestamp

        assert (await _invalid(stats, start_time=Timestamp(seconds=-5)))[0] == "start_time"
        assert (await _invalid(stats, end_time=Timestamp(seconds=5, nanos=-1)))[0] == "end_time"
        # The limits themselves are fine: 100 groups a page, 1,440 minutes of a day.
        assert list((await stats.get(page_size=100, bucket=pb.TIME_BUCKET_MINUTE)).groups) == []


async def test_a_page_token_only_continues_its_own_request(model_server, tmp_path):
    async with stats_server(model_server, tmp_path, "sqlite") as stats:
        first = await stats.get(page_size=1)
        token = first.next_page_token
        assert token
        for changed in ({"agent": "triage"}, {"bucket": pb.TIME_BUCKET_DAY}, {"group_by_agent_version": True},
                        {"agent_version": 1}):
            assert (await _invalid(stats, page_size=1, page_token=token, **changed))[0] == "page_token"
        with pytest.raises(grpc.aio.AioRpcError) as other_tenant:
            await stats.get(OTHER, page_size=1, page_token=token)
        assert other_tenant.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- runs the server ran, and traces archived before version 4 -------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "memory"])
async def test_runs_the_server_ran_are_counted(model_server, tmp_path, backend):
    async with stats_server(model_server, tmp_path, backend, runs=[]) as stats:
        h = stats.harness
        runner = AgentdClient(h.target, token=stats.keys["runs-only"])
        try:
            h.model.set_script("assistant", Script.of(calls(call("get_weather", city="Oslo")), say("sunny")))
            events = await collect(runner.run("assistant", "weather?"))
            assert events[-1].WhichOneof("payload") == "run_completed"
            h.model.set_script("assistant", Script.of(*[calls(call("no_such_tool"))] * 3))
            events = await collect(runner.run("assistant", "loop", max_turns=1))
            assert events[-1].WhichOneof("payload") == "run_failed"
        finally:
            await runner.close()
        await h.server.traces.flush()
        response = await stats.get()
        assert [g.agent for g in response.groups] == ["agents/assistant"]
        totals = response.groups[0].totals
        assert (totals.runs, totals.completed_runs, totals.failed_runs) == (2, 1, 1)
        assert totals.input_tokens > 0 and totals.output_tokens > 0 and totals.duration.count == 2
        assert sum(e.runs for e in totals.errors) == 1
        tools = {t.tool: (t.calls, t.errors) for t in response.groups[0].tools}
        assert tools == {"get_weather": (1, 0), "no_such_tool": (1, 1)}
        assert (totals.tool_calls, totals.tool_errors, totals.tool_error_rate) == (2, 1, 0.5)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_traces_archived_before_stats_get_outcomes_and_tool_calls(tmp_path, backend):
    """An archive at schema version 3 (before stats) with traces in it: the migration gives them their
    outcome (from status and error) and their tool calls (from their tool spans)."""
    from agentd.server.tracing.postgres import PostgresTraceArchive
    from agentd.server.tracing.postgres.schema import MIGRATIONS as PG_MIGRATIONS
    from agentd.server.tracing.sqlite import SqliteTraceArchive
    from agentd.server.tracing.sqlite.schema import MIGRATIONS as SQLITE_MIGRATIONS
    from agentd.server.tracing.memory import StatsQuery
    from tests.backends_postgres import raw_connection

    now = time.time_ns()
    rng = random.Random(4)
    runs = [make_run(rng, "default", agent, now - rng.randrange(MINUTE, HOUR)) for agent in ("triage", "billing") * 10]
    rows = [(r.trace.trace_id, r.trace.run_id, r.agent, r.trace.status, r.trace.error, r.start_ns, r.end_ns,
             r.input_tokens, r.output_tokens) for r in runs]
    spans = [(r.trace.trace_id, s.span_id, s.kind.value, s.name, s.start_ns, s.end_ns, s.error)
             for r in runs for s in r.trace.spans]
    insert_trace = ("INSERT INTO traces (trace_id, run_id, workflow_name, group_id, metadata, agent, agents, status,"
                    " error, start_ns, end_ns, input_tokens, output_tokens, span_count) VALUES ({})")
    insert_span = ("INSERT INTO trace_spans (trace_id, span_id, parent_id, kind, name, start_ns, end_ns, error,"
                   " attributes) VALUES ({})")
    stack = AsyncExitStack()
    if backend == "sqlite":
        import sqlite3

        path = tmp_path / "old-traces.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE trace_schema_version (version INTEGER NOT NULL)")
        for version, migration in enumerate(SQLITE_MIGRATIONS[:3], start=1):
            for statement in migration.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO trace_schema_version (version) VALUES (?)", (version,))
        conn.executemany(insert_trace.format("?, ?, 'w', '', '{}', ?, '[]', ?, ?, ?, ?, ?, ?, 0"), rows)
        conn.executemany(insert_span.format("?, ?, '', ?, ?, ?, ?, ?, '{}'"), spans)
        conn.commit()
        conn.close()
        archive: Any = SqliteTraceArchive(path)
    else:
        schema = new_schema()
        await stack.enter_async_context(dropped_afterwards(schema))
        raw = await raw_connection()
        try:
            await raw.execute(f"CREATE SCHEMA {schema}")
            await raw.execute(f"SET search_path TO {schema}")
            await raw.execute("CREATE TABLE trace_schema_version (version integer PRIMARY KEY,"
                              " applied_at timestamptz NOT NULL DEFAULT now())")
            for version, migration in enumerate(PG_MIGRATIONS[:3], start=1):
                await raw.execute(migration)
                await raw.execute("INSERT INTO trace_schema_version (version) VALUES ($1)", version)
            await raw.executemany(insert_trace.format(
                "$1, $2, 'w', '', '{}', $3, '[]', $4, $5, $6, $7, $8, $9, 0"), rows)
            await raw.executemany(insert_span.format("$1, $2, '', $3, $4, $5, $6, $7, '{}'"), spans)
        finally:
            await raw.close()
        archive = PostgresTraceArchive(url=POSTGRES_URL, schema=schema)
    try:
        await archive.open()
        groups, more = await archive.stats(StatsQuery("default", now - DAY, now, HOUR, 20))
    finally:
        await archive.close()
        await stack.aclose()
    assert not more and [g.agent for g in groups] == ["billing", "triage"]
    for group in groups:
        mine = [r for r in runs if r.agent == group.agent]
        totals = group.totals
        assert (totals.runs, totals.completed, totals.failed, totals.cancelled) == (
            len(mine), *(sum(r.outcome == o for r in mine) for o in ("completed", "failed", "cancelled")))
        assert set(totals.errors) <= {""}  # no codes were recorded then
        assert totals.ttft_ms.count == 0 and totals.cost_nanos == 0 and totals.unpriced_runs == 0
        assert (totals.tool_calls, totals.tool_errors) == (sum(len(r.tools) for r in mine),
                                                           sum(t[1] for r in mine for t in r.tools))
        assert sum(t.calls for t in group.tools) == totals.tool_calls


# --- agentd stats ------------------------------------------------------------------------------------------


def _ms(ns: int) -> str:
    ms = ns / 1e6
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _usd(units: int, nanos: int) -> str:
    amount = Decimal(units) + Decimal(nanos) / Decimal(S)
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


def _spark(counts: list[int]) -> str:
    top = max(counts)
    return "".join("▁▂▃▄▅▆▇█"[math.ceil(Fraction(8 * c, top)) - 1] if c else "·" for c in counts)


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "memory"])
async def test_agentd_stats_prints_agents_trends_and_tools(model_server, tmp_path, backend):
    async with stats_server(model_server, tmp_path, backend) as stats:
        target, key = stats.harness.target, stats.keys[TENANT]
        (code, out, err), (narrow_code, narrow, narrow_err) = await asyncio.gather(
            agentd("stats", "--since", "8h", "--by", "hour", "--target", target, "--token", key),
            agentd("stats", "--since", "8h", "--target", target, "--token", key, env={"COLUMNS": "80"}),
        )
    assert code == 0 and narrow_code == 0, err + narrow_err
    print("\n" + out)
    lines = out.splitlines()
    # The window the CLI asked for: the 8 hours before it ran (within a few seconds of the fixture's now).
    end = stats.now_ns + 60 * S
    expected = {g["agent"].removeprefix("agents/"): g for g in
                expected_stats(stats.runs, TENANT, stats.now_ns - 8 * HOUR, end)}
    assert "agents" in lines[0] and f"{RUNS} run(s)" in out and "runs per hour" in out
    for agent, group in expected.items():
        totals = group["totals"]
        row = next(line for line in lines if line.split()[:1] == [agent])
        cells = row.split()
        assert cells[1] == str(totals["runs"]) and cells[2] == f"{totals['success_rate'] * 100:.1f}%", row
        assert f"{_ms(totals['duration'][1])} " in row and f"{_ms(totals['duration'][2])} " in row, row
        assert _ms(totals["ttft"][1]) in row and _usd(*totals["cost"][1:]) in row, row
        top = max(totals["errors"].items(), key=lambda item: (item[1], -item[0]))
        name = run_event_pb2.RunErrorCode.Name(top[0]).removeprefix("RUN_ERROR_CODE_").lower()
        assert f"{'unknown' if name == 'unspecified' else name} {top[1]}" in row, row
        # The trend: a character per hour of the window (8 or 9 buckets), runs per bucket.
        first_bucket = (stats.now_ns - 8 * HOUR) // HOUR
        counts = [0] * 9
        for start, figures in group["buckets"].items():
            counts[start // HOUR - first_bucket] += figures["runs"]
        # (Its empty first or last bucket may fall on either side of the window, whose end is the CLI's now.)
        assert cells[-1].strip("·") == _spark(counts).strip("·") and len(cells[-1]) in (8, 9), (row, counts)
        # Its tools: calls, errors and error rate.
        for tool, calls_made, errors, rate, _ in group["tools"]:
            tool_row = next(line.split() for line in lines if line.split()[:2] == [agent, tool])
            assert tool_row[2:5] == [str(calls_made), str(errors), f"{rate * 100:.1f}%"], tool_row
    # 80 columns: nothing wider, every agent and its counts and trend still there, no cell wrapped.
    narrow_lines = narrow.splitlines()
    assert all(cell_len(line) <= 80 for line in narrow_lines), narrow
    for agent, group in expected.items():
        row = next(line for line in narrow_lines if line.split()[:1] == [agent])
        assert row.split()[1] == str(group["totals"]["runs"]) and set(row.split()[-1]) <= set("▁▂▃▄▅▆▇█·"), row
    assert "runs per minute" not in narrow and "runs per hour" in narrow  # 8 hours: hourly by default


async def test_agentd_stats_filters_and_errors(model_server, tmp_path):
    async with stats_server(model_server, tmp_path, "sqlite") as stats:
        target, key = stats.harness.target, stats.keys[TENANT]
        runs = await asyncio.gather(
            agentd("stats", "--agent", "triage", "--by-version", "--since", "1d", "--target", target, "--token", key),
            agentd("stats", "--target", target, "--token", stats.keys[NOBODY]),
            agentd("stats", "--since", "3d", "--by", "minute", "--target", target, "--token", key),
            agentd("stats", "--since", "soon", "--target", target, "--token", key),
            agentd("stats", "--target", target),
        )
    (code, out, err), (empty_code, empty, _), (bad_code, _, bad_err), (since_code, _, since_err), (anon, _, anon_err) = runs
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["triage"]]
    per_version = expected_stats(stats.runs, TENANT, stats.now_ns - DAY, stats.now_ns + 60 * S, agent="triage",
                                 by_version=True)
    assert [(row[1], row[2]) for row in rows if len(row) > 2 and row[1].startswith("v")][:2] == [
        ("v1", str(per_version[0]["totals"]["runs"])), ("v2", str(per_version[1]["totals"]["runs"]))]
    assert "billing" not in out and "agent versions" in out
    assert empty_code == 0 and "no ended runs from" in empty
    assert bad_code == 1 and "INVALID_ARGUMENT" in bad_err and "bucket" in bad_err
    assert since_code == 2 and "not a duration" in since_err
    assert anon == 1 and "UNAUTHENTICATED" in anon_err


# --- the service on the server --------------------------------------------------------------------------------


async def test_the_service_is_healthy_and_described_by_reflection(model_server, tmp_path):
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with stats_server(model_server, tmp_path, "sqlite", runs=[]) as stats:
        async with grpc.aio.insecure_channel(stats.harness.target) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="agentd.v1.StatsService"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            async def ask():
                yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="agentd.v1.StatsService")

            token = [("authorization", f"Bearer {stats.keys[TENANT]}")]  # reflection is authenticated too
            async for reply in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    ask(), metadata=token):
                files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                         for raw in reply.file_descriptor_response.file_descriptor_proto]
                break
    names = {f.name for f in files}
    # The service's file and what it imports (the costs' google.type.Money among them).
    assert {"agentd/v1/stats_service.proto", "google/type/money.proto", "agentd/v1/run_event.proto"} <= names
    service = next(f for f in files if f.name == "agentd/v1/stats_service.proto").service[0]
    assert [m.name for m in service.method] == ["GetStats", "GetLiveStats"]
