"""Cancels that must not be lost, and runs that must not come back (issue 11).

Every race is played at an exact point with a hook, never by luck or a sleep:

- a cancel that lands as a store write inside ``asyncio.wait_for`` completes (Python 3.11's
  ``wait_for`` then swallows it; redis-py wraps every socket write in one) still ends the
  run at its next step boundary, and the next tool never starts, whichever way the cancel
  came (CancelRun, a cancel on the Run stream, the caller going away);
- a cancel recorded in the store by another replica (its control message lost) stops the
  tools of the turn being made durable;
- a run whose creating call was cancelled (the caller went away, its deadline passed) or
  failed after the store write is ended as cancelled and never executes, not even after
  its lease would have expired.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from agentd.server import Script, call, calls, say
from agentd.server.runs.active import ActiveRun
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.v1 import agent_service_pb2 as pb
from tests.race_util import (
    MODEL,
    intercept,
    kinds,
    model_requests,
    reset_book,
    shared_stores,
    start_message,
    start_replica,
    stop_replica,
    watch,
)
from tests.runs_util import outcome, stream_outcome

ENGINES = ("memory", "redis", "postgres")
SHARED = ("redis", "postgres")

TWO_TOOL_TURNS = Script.of(calls(call("act", label="first")), calls(call("act", label="second")), say("done"))


# --- a cancel swallowed by asyncio.wait_for ------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", ["cancel_run", "run_stream_cancel", "caller_goes_away"])
async def test_a_cancel_swallowed_by_wait_for_still_ends_the_run(engine, path, model_server, tmp_path, monkeypatch):
    book = reset_book()
    model_server.set_script(MODEL, TWO_TOOL_TURNS)
    reached = asyncio.Event()  # the first step's session write is in flight
    cancel_seen = asyncio.Event()  # the cancel was handed to the executing run
    real_cancel = ActiveRun.cancel

    def cancel(self: ActiveRun, reason: str) -> None:
        real_cancel(self, reason)
        cancel_seen.set()

    monkeypatch.setattr(ActiveRun, "cancel", cancel)
    async with shared_stores(engine) as stores:
        replica = await start_replica(model_server, tmp_path, "solo", **stores)
        try:
            sessions = replica.server.store
            real_append = sessions.append_items

            async def append_items(session_id: str, items: Any, request_id: str | None = None) -> Any:
                if not (request_id or "").endswith("/1"):
                    return await real_append(session_id, items, request_id=request_id)

                async def write() -> Any:
                    stored = await real_append(session_id, items, request_id=request_id)
                    reached.set()
                    await cancel_seen.wait()  # the write completes exactly as the cancel lands
                    return stored

                # As redis-py sends every command: inside wait_for, which on Python 3.11 returns the
                # result and drops a cancellation that arrives as its inner call finishes.
                return await asyncio.wait_for(write(), 10)

            monkeypatch.setattr(sessions, "append_items", append_items)
            client = replica.client
            start = start_message(session="sessions/s1")
            reader: asyncio.Task[Any] | None = None
            if path == "cancel_run":
                run_id = (await client.agents.CreateRun(pb.CreateRunRequest(start=start))).run.name.split("/")[1]
                await reached.wait()
                await client.agents.CancelRun(pb.CancelRunRequest(name=f"runs/{run_id}", reason="stop now"))
            elif path == "run_stream_cancel":
                stream = client.agents.Run()
                await stream.write(pb.RunRequest(start=start))
                first = await stream.read()
                run_id = first.event.run_id
                reader = asyncio.create_task(_drain(stream))
                await reached.wait()
                await stream.write(pb.RunRequest(cancel=pb.CancelRun(reason="stop now")))
            else:
                stream = client.agents.StreamRun(pb.StreamRunRequest(start=start))
                first = await stream.read()
                run_id = first.event.run_id
                await reached.wait()
                stream.cancel()  # the caller goes away: an attached run is cancelled

            events = await watch(client, run_id)
            assert kinds(events)[-1] == "run_cancelled", kinds(events)
            if path != "caller_goes_away":
                assert events[-1].run_cancelled.reason == "stop now"
            # Cancelled at the step boundary after the write: no further model turn, no further tool.
            assert book.labels() == ["first"], book.labels()
            assert model_requests(model_server) == 1
            assert kinds(events).count("tool_called") == 1
            info = (await client.agents.GetRun(pb.GetRunRequest(name=f"runs/{run_id}"))).run
            assert info.status == pb.RUN_STATUS_CANCELLED
            # The step whose write completed is in the session, whole.
            items = await client.all_items("s1")
            assert [i.WhichOneof("content") for i in items] == ["message", "tool_call", "tool_result"]
            if reader is not None:
                await asyncio.wait_for(reader, 10)
        finally:
            await stop_replica(replica)


async def _drain(stream: Any) -> None:
    while (response := await stream.read()) is not grpc.aio.EOF:
        if response.event.WhichOneof("payload") in ("run_completed", "run_failed", "run_cancelled"):
            break
    await stream.done_writing()


# --- a cancel recorded in the store, its message lost ---------------------------------------


@pytest.mark.parametrize("engine", SHARED)
async def test_no_tool_starts_after_a_cancel_recorded_in_the_store(engine, model_server, tmp_path):
    """Another replica records the cancel while the turn asking for a tool is being written; its
    control message never arrives. The turn's write sees the cancel, and the tool never starts."""
    book = reset_book()
    model_server.set_script(MODEL, Script.of(calls(call("act", label="never")), say("done")))
    async with shared_stores(engine) as stores:
        replica = await start_replica(model_server, tmp_path, "solo", **stores)
        try:
            store = replica.store
            record_cancel = store.cancel  # the store alone: no control message, no local cancel

            async def progress(real: Any, run_id: str, attempt: int, events: Any, checkpoint: Any, **kw: Any) -> Any:
                if checkpoint is not None and checkpoint.pending:
                    await record_cancel(run_id, "cancelled on another replica", event_time_ns=time.time_ns(),
                                        retention_s=60, now=time.time())
                return await real(run_id, attempt, events, checkpoint, **kw)

            intercept(store, "record_progress", progress)
            created = await replica.client.agents.CreateRun(pb.CreateRunRequest(start=start_message()))
            run_id = created.run.name.split("/")[1]
            events = await watch(replica.client, run_id)
            assert kinds(events)[-1] == "run_cancelled", kinds(events)
            assert events[-1].run_cancelled.reason == "cancelled on another replica"
            assert book.starts == [], book.labels()
            assert "tool_output" not in kinds(events)
        finally:
            await stop_replica(replica)


# --- ghost runs: a creating call that did not return ----------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", ["stream_deadline", "stream_caller_gone", "create_deadline", "create_fails"])
async def test_a_run_whose_creating_call_did_not_return_never_executes(engine, path, model_server, tmp_path,
                                                                       monkeypatch):
    book = reset_book()
    model_server.set_script(MODEL, Script.of(calls(call("act", label="ghost")), say("boo")))
    async with shared_stores(engine) as stores:
        replica = await start_replica(model_server, tmp_path, "solo", run_lease_s=1.0, **stores)
        try:
            written = asyncio.Event()  # the store holds the run
            call_gone = asyncio.Event()  # the creating call was cancelled on the server
            run_ids: list[str] = []

            async def create_run(real: Any, spec: Any, **kw: Any) -> Any:
                created = await real(spec, **kw)
                run_ids.append(spec.run_id)
                written.set()
                if path == "create_fails":
                    raise StoreUnavailableError("the reply was lost after the write")
                await call_gone.wait()  # between the store write and the launch
                return created

            intercept(replica.store, "create_run", create_run)
            manager = replica.server.runs
            real_create = manager.create

            async def create(spec: Any, policy: Any) -> Any:
                try:
                    return await real_create(spec, policy)
                except asyncio.CancelledError:
                    call_gone.set()
                    raise

            monkeypatch.setattr(manager, "create", create)
            agents = replica.client.agents
            if path == "stream_deadline":
                stream = agents.StreamRun(pb.StreamRunRequest(start=start_message()), timeout=0.3)
                code, _ = await stream_outcome(stream)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            elif path == "stream_caller_gone":
                stream = agents.StreamRun(pb.StreamRunRequest(start=start_message()))
                reading = asyncio.create_task(stream_outcome(stream))
                await written.wait()
                stream.cancel()
                await asyncio.wait({reading})  # a locally cancelled call ends its reader with CancelledError
            elif path == "create_deadline":
                code, _ = await outcome(agents.CreateRun(pb.CreateRunRequest(start=start_message()), timeout=0.3))
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                code, _ = await outcome(agents.CreateRun(pb.CreateRunRequest(start=start_message())))
                assert code == grpc.StatusCode.UNAVAILABLE
            assert run_ids  # (the client retries an UNAVAILABLE CreateRun: each attempt made its own run)
            for run_id in run_ids:
                await _assert_never_executed(replica, run_id)
            assert model_requests(model_server) == 0
            assert book.starts == []
        finally:
            await stop_replica(replica)


async def _assert_never_executed(replica: Any, run_id: str) -> None:
    """The run ended as cancelled without executing, and nothing revives it later."""
    agents = replica.client.agents
    events = await watch(replica.client, run_id, timeout_s=10)
    assert kinds(events) == ["run_cancelled"], kinds(events)  # its whole log: that one event
    assert "before it started" in events[0].run_cancelled.reason
    info = (await agents.GetRun(pb.GetRunRequest(name=f"runs/{run_id}"))).run
    assert info.status == pb.RUN_STATUS_CANCELLED and info.attempt == 1
    # Long after its lease would have expired (the store's clock moved an hour on), nothing revives it.
    requeued = await replica.store.requeue_expired(now=time.time() + 3600)
    assert run_id not in requeued
    record = await replica.store.get_run(run_id)
    assert record.status.value == "cancelled" and record.attempt == 1
