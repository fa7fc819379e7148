"""Per-tenant run limits (AGENTD_TENANT_MAX_ACTIVE_RUNS, AGENTD_TENANT_MAX_QUEUED_RUNS,
AGENTD_TENANT_START_RATE/_BURST) hold across replicas.

Over the real wire: two agentd servers sharing one Redis (or one Postgres schema), two
tenants with API keys; one tenant's runs started through either replica count against one
limit, the other tenant is unaffected, and a run that ends frees its slot. Runs wait for
an approval, so nothing depends on timing: the tests wait on events, never sleep.

On the stores: concurrent creates through two replicas never overshoot a limit, Redis'
tenant indexes empty out as runs end (and repair themselves when a record vanishes), and a
Postgres schema upgraded from version 2 counts the runs it already had.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from agentd.client import AgentdClient
from agentd.server import Script, call, calls, say
from agentd.server.auth.api_keys import create_key
from agentd.server.auth.principal import Principal
from agentd.server.runs.base import RunStore
from agentd.server.runs.codec import encode_spec
from agentd.server.runs.manager import RunManager
from agentd.server.runs.memory import MemoryControlBus, MemoryRunStore
from agentd.server.runs.postgres import MIGRATIONS
from agentd.server.runs.records import (
    TENANT_MAX_ACTIVE_RUNS,
    TENANT_MAX_QUEUED_RUNS,
    TENANT_START_RATE,
    SessionPolicy,
    TenantLimitError,
    TenantLimits,
)
from agentd.server.runs.redis import RedisRunStore
from agentd.server.runtime.events import RunCompleted, RunEvent
from agentd.server.runtime.run_loop import RunInput
from agentd.server.runtime.usage import Usage
from agentd.server.settings import Settings
from agentd.v1 import agent_service_pb2 as apb
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema, raw_connection
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix
from tests.backends_runs import run_replicas
from tests.backends_runs_postgres import run_store
from tests.conftest import Harness, start_harness
from tests.runs_util import outcome, stream_outcome, wait_for_action

SCOPES = ["agents:read", "runs:read", "runs:write", "sessions:read", "sessions:write", "traces:read"]
REFUND = Script.of(calls(call("issue_refund", order_id="A-1", amount_eur=5.0)), say("ok"))
REJECT, ENQUEUE = SessionPolicy.REJECT, SessionPolicy.ENQUEUE
LEASE = 30.0


# -- over the wire: two replicas, two tenants ----------------------------------------------


@asynccontextmanager
async def two_replicas(
    store: str, model_server, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two servers sharing one deployment's stores (sessions and runs on ``store``)."""
    namespace = new_prefix() if store == "redis" else new_schema()
    if store == "postgres":
        settings.update(store="postgres", postgres_url=POSTGRES_URL, postgres_schema=namespace)
    else:
        settings.update(store="redis", redis_url=REDIS_URL, redis_prefix=namespace)
    async with AsyncExitStack() as stack:
        if store == "postgres":
            await stack.enter_async_context(dropped_afterwards(namespace))
        else:
            stack.push_async_callback(delete_prefix, namespace)
        replicas = []
        for n in (1, 2):
            h = await start_harness(model_server, tmp_path, replica_id=f"replica-{n}", **settings)
            stack.push_async_callback(h.server.stop, 0)
            stack.push_async_callback(h.client.close)
            replicas.append(h)
        yield replicas[0], replicas[1]


def keys_for_two_tenants(tmp_path: Path) -> tuple[Path, str, str]:
    keys = tmp_path / "keys.json"
    _, acme = create_key(keys, tenant="acme", subject="ann", scopes=SCOPES)
    _, globex = create_key(keys, tenant="globex", subject="bob", scopes=SCOPES)
    return keys, acme, globex


def refund_start(request_id: str = "") -> apb.StartRun:
    return apb.StartRun(agent="agents/operator", input="refund A-1", request_id=request_id)





async def wait_for_end(client: AgentdClient, run_id: str) -> str:
    """The run's terminal event kind. Watched through a replica that does not execute the run, the
    terminal event comes from the shared log, where it is written with the run's final status."""
    last = ""
    async for response in client.agents.WatchRun(apb.WatchRunRequest(name=f"runs/{run_id}")):
        last = response.event.WhichOneof("payload")
    return last


async def start_waiting(client: AgentdClient, request_id: str = "") -> tuple[str, str]:
    """Start a refund run; return (run id, call id) once it waits for its approval."""
    run = (await client.agents.CreateRun(apb.CreateRunRequest(start=refund_start(request_id)))).run
    run_id = run.name.removeprefix("runs/")
    return run_id, await wait_for_action(client, run_id)


@pytest.mark.parametrize("store", ["redis", "postgres"])
async def test_active_limit_holds_across_replicas(store: str, model_server, tmp_path: Path) -> None:
    keys, key_acme, key_globex = keys_for_two_tenants(tmp_path)
    model_server.set_script("operator", REFUND)
    async with two_replicas(store, model_server, tmp_path, api_keys_file=keys, tenant_max_active_runs=2) as (one, two), \
            AgentdClient(one.target, token=key_acme) as acme1, AgentdClient(two.target, token=key_acme) as acme2, \
            AgentdClient(one.target, token=key_globex) as globex1, \
            AgentdClient(two.target, token=key_globex) as globex2:
        # acme's two runs, started through replica 1, wait for their approvals.
        first, first_call = await start_waiting(acme1, request_id="acme-1")
        second, _ = await start_waiting(acme1)

        # The third, through replica 2: refused, naming the limit; on every way to start a run.
        code, details = await outcome(acme2.agents.CreateRun(apb.CreateRunRequest(start=refund_start())))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "AGENTD_TENANT_MAX_ACTIVE_RUNS" in details and "'acme'" in details and "2 unfinished" in details
        code, details = await stream_outcome(acme2.agents.StreamRun(apb.StreamRunRequest(start=refund_start())))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "AGENTD_TENANT_MAX_ACTIVE_RUNS" in details
        # Nothing was created: acme still has exactly its two runs.
        listed = [(await acme2.agents.GetRun(apb.GetRunRequest(name=f"runs/{r}"))).run for r in (first, second)]
        assert [r.status for r in listed] == [apb.RUN_STATUS_REQUIRES_ACTION] * 2
        # A retry of acme's first CreateRun (same request id) returns that run: never refused.
        again = await acme2.agents.CreateRun(apb.CreateRunRequest(start=refund_start(request_id="acme-1")))
        assert again.run.name == f"runs/{first}"

        # globex is not affected, on either replica.
        for client in (globex1, globex2):
            await start_waiting(client)

        # acme's first run ends (approved, completes): acme may start again, through either replica.
        await acme2.agents.ApproveToolCall(apb.ApproveToolCallRequest(
            name=f"runs/{first}", approval=apb.ToolApproval(call_id=first_call, approved=True)))
        assert await wait_for_end(acme2, first) == "run_completed"
        third, _ = await start_waiting(acme2)
        code, details = await outcome(acme1.agents.CreateRun(apb.CreateRunRequest(start=refund_start())))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "AGENTD_TENANT_MAX_ACTIVE_RUNS" in details

        # A cancelled run frees its slot too once it has ended (it executes on replica 1).
        await acme2.agents.CancelRun(apb.CancelRunRequest(name=f"runs/{second}", reason="not needed"))
        assert await wait_for_end(acme2, second) == "run_cancelled"
        await start_waiting(acme1)
        code, details = await outcome(acme2.agents.CreateRun(apb.CreateRunRequest(start=refund_start())))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "AGENTD_TENANT_MAX_ACTIVE_RUNS" in details
        assert (await acme2.agents.GetRun(apb.GetRunRequest(name=f"runs/{third}"))).run.status == \
            apb.RUN_STATUS_REQUIRES_ACTION


@pytest.mark.parametrize("store", ["redis", "postgres"])
async def test_start_rate_holds_across_replicas(store: str, model_server, tmp_path: Path) -> None:
    keys, key_acme, key_globex = keys_for_two_tenants(tmp_path)
    model_server.set_script("operator", REFUND)
    # One start per 1000 s: nothing refills during the test, so the bucket is the burst alone.
    async with two_replicas(store, model_server, tmp_path, api_keys_file=keys, tenant_start_rate=0.001,
                            tenant_start_burst=2) as (one, two), \
            AgentdClient(one.target, token=key_acme) as acme1, AgentdClient(two.target, token=key_acme) as acme2, \
            AgentdClient(two.target, token=key_globex) as globex2:
        for client in (acme1, acme2):
            await client.agents.CreateRun(apb.CreateRunRequest(start=refund_start()))
        code, details = await outcome(acme2.agents.CreateRun(apb.CreateRunRequest(start=refund_start())))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "AGENTD_TENANT_START_RATE" in details and "'acme'" in details and "retry in" in details
        code, details = await outcome(acme1.agents.CreateRun(apb.CreateRunRequest(start=refund_start())))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "AGENTD_TENANT_START_RATE" in details
        await globex2.agents.CreateRun(apb.CreateRunRequest(start=refund_start()))


def test_settings_reach_the_manager() -> None:
    settings = Settings(tenant_max_active_runs=5, tenant_max_queued_runs=3, tenant_start_rate=2.5)
    assert settings.tenant_start_burst is None
    manager = RunManager(None, MemoryRunStore(), MemoryControlBus(),  # type: ignore[arg-type]
                         tenant_max_active_runs=settings.tenant_max_active_runs,
                         tenant_max_queued_runs=settings.tenant_max_queued_runs,
                         tenant_start_rate=settings.tenant_start_rate,
                         tenant_start_burst=settings.tenant_start_burst)
    assert manager._tenant_limits == TenantLimits(5, 3, 2.5, 3)  # burst: max(1, ceil(rate))
    assert TenantLimits(start_rate=0.2).start_burst == 1 and TenantLimits(start_rate=4, start_burst=9).start_burst == 9
    assert RunManager(None, MemoryRunStore(), MemoryControlBus())._tenant_limits is None  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Settings(tenant_max_active_runs=-1)
    with pytest.raises(ValueError):
        Settings(tenant_start_rate=float("nan"))


# -- on the stores ---------------------------------------------------------------------------


def spec(tenant: str | None, session: str | None = None, request_id: str = "") -> RunInput:
    return RunInput(run_id=f"run_{uuid.uuid4().hex}", agent="assistant", input="hi", session_id=session,
                    request_id=request_id, principal=Principal("u", tenant) if tenant is not None else None)


async def create(store: RunStore, s: RunInput, limits: TenantLimits | None, **kwargs: Any) -> str:
    """'created', or the limit that refused it."""
    options: dict[str, Any] = {"policy": REJECT, "owner": None, "lease_s": LEASE, "max_queued": 1000, "now": time.time()}
    try:
        await store.create_run(s, limits=limits, **{**options, **kwargs})
    except TenantLimitError as exc:
        return exc.limit_name
    return "created"


async def end(store: RunStore, run_id: str, attempt: int, now: float) -> None:
    """Finish a run that has no events yet (completed)."""
    final = RunCompleted("ok", "assistant", Usage(1, 1, 1), 1, 0.1)
    await store.finish(run_id, attempt, [RunEvent(run_id, 1, time.time_ns(), "t" * 32, final)], retention_s=1,
                       now=now)


@pytest.mark.parametrize("engine", ["redis", "postgres"])
async def test_concurrent_creates_through_two_replicas_never_overshoot(engine: str) -> None:
    async with run_replicas(engine) as replica:
        (one, _), (two, _) = await replica(), await replica()
        now = time.time()
        for tenant, limits, name, allowed in (
            ("active", TenantLimits(max_active=3), TENANT_MAX_ACTIVE_RUNS, 3),
            ("queued", TenantLimits(max_queued=4), TENANT_MAX_QUEUED_RUNS, 4),
            ("rate", TenantLimits(start_rate=0.001, start_burst=5), TENANT_START_RATE, 5),
        ):
            outcomes = await asyncio.gather(*(
                create(one if i % 2 else two, spec(tenant), limits, now=now) for i in range(24)
            ))
            assert sorted(outcomes) == sorted(["created"] * allowed + [name] * (24 - allowed)), tenant


async def test_redis_tenant_indexes_follow_the_runs() -> None:
    async with run_replicas("redis") as replica:
        store, _ = await replica()
        assert isinstance(store, RedisRunStore)
        raw = Redis.from_url(REDIS_URL)
        base = store.key_base.encode()
        active, queued = base + b"tenant:acme:active", base + b"tenant:acme:queued"
        try:
            limits = TenantLimits(max_active=10, max_queued=10)
            t0 = time.time()
            # Without per-tenant limits in force a run is in no tenant index (nothing to keep up).
            await store.create_run(spec("acme"), policy=REJECT, owner=None, lease_s=LEASE, max_queued=100, now=t0)
            assert not await raw.exists(active, queued)

            running, head, behind, alone = spec("acme"), spec("acme", "s"), spec("acme", "s"), spec("acme")
            await store.create_run(running, policy=REJECT, owner="ra", lease_s=LEASE, max_queued=100, now=t0,
                                   limits=limits)
            await store.create_run(head, policy=REJECT, owner=None, lease_s=LEASE, max_queued=100, now=t0,
                                   limits=limits)
            await store.create_run(behind, policy=ENQUEUE, owner=None, lease_s=LEASE, max_queued=100, now=t0,
                                   limits=limits)
            await store.create_run(alone, policy=REJECT, owner=None, lease_s=LEASE, max_queued=100, now=t0,
                                   limits=limits)
            ids = lambda *specs: {s.run_id.encode() for s in specs}
            assert await raw.smembers(active) == ids(running, head, behind, alone)
            assert await raw.smembers(queued) == ids(head, alone)
            await store.cancel(alone.run_id, "x", event_time_ns=1, retention_s=60, now=t0)
            claimed = await store.claim("rb", 5, lease_s=LEASE, now=t0, wait_s=0)
            assert {r.run_id for r in claimed} >= {head.run_id}
            assert await raw.smembers(queued) == set()
            # head ends: behind joins the queue (and its index).
            await end(store, head.run_id, 1, t0)
            assert await raw.smembers(queued) == ids(behind)
            assert await store.release(running.run_id, 1, now=t0)
            assert await raw.smembers(queued) == ids(behind, running)
            for r in await store.claim("rc", 5, lease_s=LEASE, now=t0, wait_s=0):
                await end(store, r.run_id, r.attempt, t0)
            # Every run ended: the indexes are gone, and sweeping the runs leaves nothing behind.
            assert not await raw.exists(active, queued)
            await store.sweep(now=t0 + 100)
            assert not await raw.exists(active, queued)

            # A record that vanished outside the scripts (eviction, say) does not hold a slot forever.
            one = TenantLimits(max_active=1)
            lost = spec("acme")
            assert await create(store, lost, one) == "created"
            assert await create(store, spec("acme"), one) == TENANT_MAX_ACTIVE_RUNS
            await raw.delete(base + b"run:" + lost.run_id.encode())
            assert await create(store, spec("acme"), one) == "created"
            assert await raw.scard(active) == 1

            # The start bucket is one small hash that expires once full again.
            assert await create(store, spec("acme"), TenantLimits(start_rate=0.5, start_burst=2)) == "created"
            bucket_ttl = await raw.pttl(base + b"tenant:acme:bucket")
            assert 2_000 < bucket_ttl <= 3_000  # one token to refill at 0.5/s, plus a second of margin
        finally:
            await raw.aclose()


async def test_postgres_schema_upgraded_from_version_2_counts_its_runs() -> None:
    schema = new_schema()
    q = f'"{schema}"'
    async with dropped_afterwards(schema):
        raw = await raw_connection()
        try:
            async with raw.transaction():
                await raw.execute(f"CREATE SCHEMA {q}")
                await raw.execute(f"SET LOCAL search_path TO {q}, pg_temp")
                await raw.execute(f"CREATE TABLE {q}.run_schema_version"
                                  " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
                for version in (1, 2):
                    await raw.execute(MIGRATIONS[version - 1])
                    await raw.execute(f"INSERT INTO {q}.run_schema_version (version) VALUES ($1)", version)
            now = time.time()
            old_create = f"SELECT * FROM {q}.agentd_run_create($1, NULL, NULL, $2, true, NULL, $3, 100, $4)"
            # An acme run created by an agentd of version 2, and one of the default tenant.
            for s in (spec("acme"), spec(None)):
                await raw.fetchrow(old_create, s.run_id, encode_spec(s), now + LEASE, now)
            store = run_store(schema)
            await store.open()
            try:
                assert await create(store, spec("acme"), TenantLimits(max_active=1)) == TENANT_MAX_ACTIVE_RUNS
                assert await create(store, spec("acme"), TenantLimits(max_active=2)) == "created"
                assert await create(store, spec(None), TenantLimits(max_active=1)) == TENANT_MAX_ACTIVE_RUNS
                assert await create(store, spec("globex"), TenantLimits(max_active=1)) == "created"
                # An older replica still creates through the old signature, and its runs count.
                late = spec("acme")
                await raw.fetchrow(old_create, late.run_id, encode_spec(late), now + LEASE, now)
                assert await create(store, spec("acme"), TenantLimits(max_active=3)) == TENANT_MAX_ACTIVE_RUNS
                tenants = await raw.fetch(f"SELECT tenant, count(*) AS n FROM {q}.runs GROUP BY tenant ORDER BY tenant")
                assert [(r["tenant"], r["n"]) for r in tenants] == [("acme", 3), ("default", 1), ("globex", 1)]
                # Buckets full again are swept.
                assert await create(store, spec("acme"), TenantLimits(start_rate=1, start_burst=1)) == "created"
                assert await raw.fetchval(f"SELECT count(*) FROM {q}.run_tenant_buckets") == 1
                await store.sweep(now=now + 3600)
                assert await raw.fetchval(f"SELECT count(*) FROM {q}.run_tenant_buckets") == 0
            finally:
                await store.close()
        finally:
            await raw.close()
