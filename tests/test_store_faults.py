"""Database outages seen through the real server: Postgres and Redis behind a fault proxy.

The proxy sits between agentd and the real database on this machine, so an outage is
played without touching the shared server: ``cut`` resets every connection and refuses
new ones (a restart or crash), ``stall`` swallows all traffic (a partition). Checked:
RPCs get UNAVAILABLE with a message, health goes NOT_SERVING and back, a run that
cannot save its step fails with SESSION_UNAVAILABLE, no partial step remains, and the
store reconnects on its own once the database is back.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.server import Script, call, calls, say
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import run_event_pb2
from agentd.client import AgentdClient
from tests.conftest import Harness, start_harness
from tests.fault_proxy import FaultProxy
from tests.runs_util import collect

POSTGRES_URL = os.environ.get("AGENTD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AGENTD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _via_proxy(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return parts._replace(netloc=f"{userinfo}127.0.0.1:{port}").geturl()


@asynccontextmanager
async def server_behind_proxy(
    backend: str, model_server: ScriptedOpenAIServer, tmp_path: Path
) -> AsyncIterator[tuple[Harness, FaultProxy]]:
    url = POSTGRES_URL if backend == "postgres" else REDIS_URL
    upstream = urlsplit(url)
    namespace = f"agentd_fault_{uuid.uuid4().hex[:10]}"
    async with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 0) as proxy:
        if backend == "postgres":
            settings = dict(
                store="postgres",
                postgres_url=_via_proxy(url, proxy.port),
                postgres_schema=namespace,
                postgres_connect_timeout_s=1.0,
                postgres_command_timeout_s=1.0,
            )
        else:
            settings = dict(store="redis", redis_url=_via_proxy(url, proxy.port), redis_prefix=namespace, redis_timeout_s=1.0)
        # Runs stay in memory here: these tests are about the session store failing under a run.
        try:
            h = await start_harness(model_server, tmp_path, store_health_interval_s=0.2, run_store="memory",
                                    **settings)
        except BaseException:
            await _drop_namespace(backend, namespace)
            raise
        # Without client retries: each test measures what one call costs against a failing store.
        await h.client.close()
        h.client = AgentdClient(h.target, retry=False)
        try:
            yield h, proxy
        finally:
            proxy.restore()
            await h.client.close()
            await h.server.stop(grace_s=0)
            await _drop_namespace(backend, namespace)


async def _drop_namespace(backend: str, namespace: str) -> None:
    if backend == "postgres":
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        finally:
            await conn.close()
    else:
        client = aioredis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{namespace}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def wait_for_health(target: str, wanted: int, timeout_s: float = 5.0) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            status = (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status
            if status == wanted:
                return
            assert time.monotonic() < deadline, f"health stayed {status}, wanted {wanted}"
            await asyncio.sleep(0.05)


async def wait_for_items(h: Harness, session_id: str, count: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await h.client.get_session(session_id)).item_count >= count:
                return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # the run has not created it yet
                raise
        assert time.monotonic() < deadline, f"session {session_id} never reached {count} items"
        await asyncio.sleep(0.02)


BACKENDS = ["postgres", "redis"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_database_restart_mid_run(backend: str, model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    async with server_behind_proxy(backend, model_server, tmp_path) as (h, proxy):
        await wait_for_health(h.target, SERVING)
        # Step 1 (tool call + result) is saved; the database dies while the model writes step 2.
        h.model.set_script("assistant", Script.of(
            calls(call("get_weather", city="Oslo")),
            say("It is 21 degrees in Oslo.", delay_s=1.0),
        ))
        run = asyncio.create_task(collect(h.client.run("assistant", "Weather in Oslo?", session_id="conv")))
        await wait_for_items(h, "conv", 3)
        proxy.cut()

        # While it is down: calls fail fast with UNAVAILABLE and say why; health follows.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.client.get_session("conv")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"{backend} store" in info.value.details()
        await wait_for_health(h.target, NOT_SERVING)

        events = await asyncio.wait_for(run, 10)
        failed = events[-1]
        assert failed.WhichOneof("payload") == "run_failed"
        assert failed.run_failed.code == run_event_pb2.RUN_ERROR_CODE_SESSION_UNAVAILABLE
        assert "could not save" in failed.run_failed.message and "conv" in failed.run_failed.message
        # The stream said everything it had before failing: the answer was streamed, not saved.
        assert any(e.WhichOneof("payload") == "message_output" for e in events)

        # Back up: health recovers and the store reconnects without a restart of agentd.
        proxy.restore()
        await wait_for_health(h.target, SERVING)
        items = await h.client.all_items("conv")
        assert [i.WhichOneof("content") for i in items] == ["message", "tool_call", "tool_result"]
        assert [i.sequence for i in items] == [1, 2, 3]

        h.model.set_script("assistant", Script.of(say("Still 21 degrees.")))
        again = await collect(h.client.run("assistant", "And now?", session_id="conv"))
        assert again[-1].WhichOneof("payload") == "run_completed"
        assert [i.sequence for i in await h.client.all_items("conv")] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_partitioned_database_times_out_instead_of_hanging(
    backend: str, model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    async with server_behind_proxy(backend, model_server, tmp_path) as (h, proxy):
        await h.client.create_session("p1")
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.client.get_session("p1")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5, "a stalled database must cost a timeout, not a hang"
        await wait_for_health(h.target, NOT_SERVING)

        proxy.restore()
        await wait_for_health(h.target, SERVING, timeout_s=10)
        assert (await h.client.get_session("p1")).name == "sessions/p1"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_run_that_cannot_read_its_session_fails_cleanly(
    backend: str, model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    async with server_behind_proxy(backend, model_server, tmp_path) as (h, proxy):
        h.model.set_script("assistant", Script.of(say("never said")))
        proxy.cut()
        async def read_all() -> list[run_event_pb2.RunEvent]:
            return [event async for event in h.client.run("assistant", "hi", session_id="down")]

        # The run could not start, so its stream is the failure alone.
        events = await asyncio.wait_for(read_all(), 10)
        assert [e.WhichOneof("payload") for e in events] == ["run_failed"]
        assert events[0].run_failed.code == run_event_pb2.RUN_ERROR_CODE_SESSION_UNAVAILABLE
        assert model_server.requests == []  # no model call for a run that could not start
        proxy.restore()
        await wait_for_health(h.target, SERVING)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.client.get_session("down")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # nothing half-created
