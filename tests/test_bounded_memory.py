"""Bounded memory under hostile load (issue 11): the embedded run store forgets ended runs
beyond a count and a size, and a stream whose client does not keep up is ended with
RESOURCE_EXHAUSTED (the run goes on; the client re-attaches with WatchRun)."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from agentd.server import Script, say
from agentd.server.runs.memory import EVENT_OVERHEAD_BYTES, MemoryRunStore
from agentd.server.runs.records import RunStatus, SessionPolicy
from agentd.server.runtime.events import RunCompleted, RunEvent, TextDelta
from agentd.server.runtime.run_loop import RunInput
from agentd.server.runtime.usage import Usage
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import agent_service_pb2_grpc as apb_grpc
from tests.conftest import start_harness
from tests.race_util import shared_stores

WORDS = 3000  # text deltas of the long answer
LAG = 200  # the stream limit in these tests: far below WORDS


def make_spec(request_id: str = "") -> RunInput:
    return RunInput(run_id=f"run_{uuid.uuid4().hex}", agent="assistant", input="hi", request_id=request_id)


async def ended_run(store: MemoryRunStore, deltas: int, text: str = "x" * 100, request_id: str = "") -> str:
    spec = make_spec(request_id)
    await store.create_run(spec, policy=SessionPolicy.REJECT, owner="r1", lease_s=30, max_queued=10, now=time.time())
    events = [RunEvent(spec.run_id, i + 1, time.time_ns(), "t", TextDelta("assistant", text)) for i in range(deltas)]
    end = RunCompleted("ok", "assistant", Usage(), 1, 0.1)
    events.append(RunEvent(spec.run_id, deltas + 1, time.time_ns(), "t", end))
    await store.finish(spec.run_id, 1, events, retention_s=3600, now=time.time())
    return spec.run_id


async def test_ended_runs_are_bounded_by_count_oldest_first() -> None:
    store = MemoryRunStore(max_ended_runs=3)
    first = await ended_run(store, 2, request_id="req-first")
    rest = [await ended_run(store, 2) for _ in range(3)]
    assert await store.get_run(first) is None  # forgotten as after its retention
    assert await store.read_events(first, 0, 10) == []
    assert [(await store.get_run(r)).status for r in rest] == [RunStatus.COMPLETED] * 3
    # Its request id is free again, as after retention.
    again = make_spec("req-first")
    created = await store.create_run(again, policy=SessionPolicy.REJECT, owner=None, lease_s=30, max_queued=10,
                                     now=time.time())
    assert created.created


async def test_ended_runs_are_bounded_by_bytes_oldest_first() -> None:
    per_run = 101 * (EVENT_OVERHEAD_BYTES + 100)  # 100 deltas of 100 characters, and the terminal event
    store = MemoryRunStore(max_ended_runs=1000, max_ended_bytes=per_run * 3)
    runs = [await ended_run(store, 100) for _ in range(6)]
    kept = [r for r in runs if await store.get_run(r) is not None]
    assert kept == runs[-len(kept):] and 1 <= len(kept) <= 3  # the newest, within the size
    # One run bigger than the bound alone is kept until the next one ends.
    big = await ended_run(store, 1000)
    assert await store.get_run(big) is not None and [await store.get_run(r) for r in runs] == [None] * 6
    assert len(await store.read_events(big, 0, 5000)) == 1001


async def test_unfinished_runs_are_never_forgotten() -> None:
    store = MemoryRunStore(max_ended_runs=1)
    running = make_spec()
    await store.create_run(running, policy=SessionPolicy.REJECT, owner="r1", lease_s=30, max_queued=10, now=time.time())
    for _ in range(3):
        await ended_run(store, 1)
    assert (await store.get_run(running.run_id)).status is RunStatus.RUNNING


async def test_forgotten_run_is_not_found_over_grpc(model_server, tmp_path) -> None:
    model_server.set_script("assistant", Script.of(say("done")))
    h = await start_harness(model_server, tmp_path, store="memory", run_memory_max_ended_runs=2)
    channel = grpc.aio.insecure_channel(h.target)
    try:
        stub = apb_grpc.AgentServiceStub(channel)
        ids = []
        for i in range(3):
            async for response in stub.StreamRun(apb.StreamRunRequest(start=apb.StartRun(agent="agents/assistant",
                                                                                        input=f"go {i}"))):
                last = response.event
            assert last.WhichOneof("payload") == "run_completed"
            ids.append(last.run_id)
        for call in (lambda: stub.GetRun(apb.GetRunRequest(name=f"runs/{ids[0]}")),
                     lambda: stub.WatchRun(apb.WatchRunRequest(name=f"runs/{ids[0]}")).read()):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert (await stub.GetRun(apb.GetRunRequest(name=f"runs/{ids[2]}"))).run.status == apb.RUN_STATUS_COMPLETED
    finally:
        await channel.close()
        await h.client.close()
        await h.server.stop(grace_s=0)


@pytest.mark.parametrize("engine", ["memory", "redis"])
async def test_a_stalled_stream_is_ended_and_re_attaches(engine, model_server, tmp_path) -> None:
    model_server.set_script("assistant", Script.of(say(" ".join(f"w{i}" for i in range(WORDS)))))
    async with shared_stores(engine) as stores:
        h = await start_harness(model_server, tmp_path, max_stream_lag_events=LAG, **stores)
        # No BDP probing: the client's flow-control window stays small, so a client that does not read
        # soon stops taking messages and the server's stream falls behind the run.
        stalled_channel = grpc.aio.insecure_channel(h.target, options=[("grpc.http2.bdp_probe", 0),
                                                                       ("grpc.http2.lookahead_bytes", 1024)])
        channel = grpc.aio.insecure_channel(h.target)
        try:
            stalled = apb_grpc.AgentServiceStub(stalled_channel).StreamRun(
                apb.StreamRunRequest(start=apb.StartRun(agent="agents/assistant", input="talk")))
            first = (await stalled.read()).event  # then nothing is read until the run has ended
            run_id = first.run_id
            local = h.server.runs._local.get(run_id)
            if local is not None:  # executing here (it is: one replica); wait for its end, not reading
                await local.wait()
            got = [first.sequence]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while (response := await stalled.read()) is not grpc.aio.EOF:
                    got.append(response.event.sequence)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "events behind" in err.value.details() and "WatchRun(after_sequence=" in err.value.details()
            assert got == list(range(1, len(got) + 1)) and len(got) < WORDS
            # Re-attach after the last sequence received (again if this reader falls behind too).
            stub = apb_grpc.AgentServiceStub(channel)
            end = None
            while end is None:
                try:
                    async for response in stub.WatchRun(apb.WatchRunRequest(name=f"runs/{run_id}",
                                                                            after_sequence=got[-1])):
                        got.append(response.event.sequence)
                        if response.event.WhichOneof("payload") == "run_completed":
                            end = response.event
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert got == list(range(1, end.sequence + 1))  # gap-free, and the attached run completed
        finally:
            await stalled_channel.close()
            await channel.close()
            await h.client.close()
            await h.server.stop(grace_s=0)
