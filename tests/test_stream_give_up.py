"""A resuming client that cannot re-attach within its budget raises the documented
``RunStreamError`` (run id and last sequence, the last transport error as its cause), never
a raw gRPC error (issue 11): from the start (no server at all) and mid-run (the server stopped
after some events), for the async and the sync client."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from agentd.client import AgentdClient, RunStreamError, SyncAgentdClient
from agentd.server import Script, call, calls
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix
from tests.cluster import free_port
from tests.conftest import start_harness

BUDGET_S = 0.4


def assert_gave_up(error: RunStreamError, started: float) -> None:
    assert not isinstance(error, grpc.RpcError)
    assert isinstance(error.__cause__, grpc.RpcError), repr(error.__cause__)
    assert error.__cause__.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert "resume_timeout_s" in str(error)
    assert time.monotonic() - started < BUDGET_S + 8  # the budget, plus one fail-fast cancel attempt


async def test_the_async_client_raises_run_stream_error_when_no_server_answers() -> None:
    started = time.monotonic()
    async with AgentdClient(f"127.0.0.1:{free_port()}", resume_timeout_s=BUDGET_S) as client:
        with pytest.raises(RunStreamError) as lost:
            async for _ in client.run("assistant", "anyone there?"):
                pass
    assert lost.value.last_sequence == 0
    assert_gave_up(lost.value, started)


def test_the_sync_client_raises_run_stream_error_when_no_server_answers() -> None:
    started = time.monotonic()
    with SyncAgentdClient(f"127.0.0.1:{free_port()}", resume_timeout_s=BUDGET_S) as client:
        with pytest.raises(RunStreamError) as lost:
            for _ in client.run("assistant", "anyone there?"):
                pass
    assert lost.value.last_sequence == 0
    assert_gave_up(lost.value, started)


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_a_stream_whose_server_stopped_mid_run_raises_run_stream_error(flavour, model_server, tmp_path) -> None:
    """Runs on Redis: the stopping server hands the run off (no terminal event), and then nobody answers."""
    model_server.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="forever"))))
    prefix = new_prefix()
    h = await start_harness(model_server, tmp_path, run_store="redis", redis_url=REDIS_URL, redis_prefix=prefix)
    stopped = False
    try:
        tool_called = asyncio.Event()
        loop = asyncio.get_running_loop()
        if flavour == "async":
            async def consume() -> tuple[RunStreamError, float, str, int]:
                async with AgentdClient(h.target, resume_timeout_s=BUDGET_S) as client:
                    stream = client.run("assistant", "go")
                    with pytest.raises(RunStreamError) as lost:
                        async for event in stream:
                            if event.WhichOneof("payload") == "tool_called":
                                tool_called.set()
                    return lost.value, time.monotonic(), stream.run_id, stream.last_sequence

            consumer = asyncio.ensure_future(consume())
        else:
            def consume_sync() -> tuple[RunStreamError, float, str, int]:
                with SyncAgentdClient(h.target, resume_timeout_s=BUDGET_S) as client:
                    stream = client.run("assistant", "go")
                    with pytest.raises(RunStreamError) as lost:
                        for event in stream:
                            if event.WhichOneof("payload") == "tool_called":
                                loop.call_soon_threadsafe(tool_called.set)
                    return lost.value, time.monotonic(), stream._log.run_id, stream._log.last_sequence

            consumer = asyncio.ensure_future(asyncio.to_thread(consume_sync))
        await asyncio.wait_for(tool_called.wait(), 10)
        started = time.monotonic()
        stopped = True
        await h.server.stop(grace_s=0)
        error, _, run_id, last = await asyncio.wait_for(consumer, 20)
        assert error.run_id == run_id and error.last_sequence == last and last >= 3
        assert_gave_up(error, started)
    finally:
        await h.client.close()
        if not stopped:
            await h.server.stop(grace_s=0)
        await delete_prefix(prefix)
