"""Takeover keeps its promise at the narrowest moments (issue 11), on Redis and Postgres.

Two replicas share the run store (and the sessions); the first is "killed" (``Crash``) at an
exact point of its run, the second takes the run over once its lease is past (the store's
clock is moved on rather than waited for). Checked:

- a tool never starts before the turn that asked for it is durable, so the resumed run
  executes the very call that was in flight (same ``call_id``), never a fresh model turn
  with a new call id;
- a call whose output the log already holds (its tool finished on the dead replica) is not
  executed again: the resumed run uses that output;
- a run resumed before its first checkpoint does not start again (one ``run_started``);
- ``RunResumed.reason`` names the cause: "lease expired" or "handed off".
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agentd.server import Script, call, calls, say
from agentd.server.runtime.events import RunStarted, ToolOutput
from agentd.v1 import agent_service_pb2 as pb
from tests.race_util import (
    MODEL,
    Crash,
    Replica,
    Start,
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

ENGINES = ("redis", "postgres")
LEASE_S = 1.0


class Pair:
    """Replica ``a`` (where runs start, and which dies) and ``b`` (which takes over)."""

    def __init__(self, a: Replica, b: Replica) -> None:
        self.a, self.b = a, b
        self.crash = Crash(a)

    async def take_over(self) -> None:
        """What b's takeover loop does once a's lease is past: requeue the run (b then claims it)."""
        assert self.crash.dead
        await asyncio.gather(*self.a.server.runs._tasks, return_exceptions=True)  # a's claim loop is gone
        await self.b.store.requeue_expired(now=time.time() + 10 * LEASE_S)

    async def create(self, **fields: Any) -> str:
        created = await self.a.client.agents.CreateRun(pb.CreateRunRequest(start=start_message(**fields)))
        assert created.run.replica == self.a.name
        return created.run.name.split("/")[1]


async def pair(model_server: Any, tmp_path: Any, stores: dict[str, Any]) -> Pair:
    a = await start_replica(model_server, tmp_path, "replica-a", run_lease_s=LEASE_S, **stores)
    b = await start_replica(model_server, tmp_path, "replica-b", run_lease_s=LEASE_S, **stores)
    return Pair(a, b)


async def close(p: Pair) -> None:
    p.crash.end()
    await stop_replica(p.b)
    await stop_replica(p.a)


def durable_check(observer: Any) -> Any:
    """An ``on_start`` hook recording whether the turn asking for the call was durable (as another
    replica would read it) when the tool started."""

    async def check(start: Start) -> None:
        record = await observer.get_run(start.run_id)
        cp = record.checkpoint if record is not None else None
        start.durable = cp is not None and any(getattr(i, "call_id", "") == start.call_id for i in cp.pending)

    return check


def one_turn_per_kind(events: list, kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("payload") == kind]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_tool_in_flight_at_a_crash_runs_again_with_the_same_call_id(engine, model_server, tmp_path):
    """The replica dies right after the tool started. Its turn was durable before the tool began,
    so the next replica executes that very call again (same call_id), not a new model turn."""
    book = reset_book()
    model_server.set_script(MODEL, Script.of(calls(call("act", label="charge")), say("charged")))
    async with shared_stores(engine, sessions=True) as stores:
        p = await pair(model_server, tmp_path, stores)
        try:
            check = durable_check(p.b.store)
            killed = asyncio.Event()

            async def on_start(start: Start) -> None:
                await check(start)
                if len(book.starts) == 1:  # on a: the replica dies the moment its tool started
                    p.crash.kill()
                    killed.set()

            book.on_start = on_start
            book.hold = {"charge"}  # a's execution never finishes (its process is gone)

            async def progress(real: Any, run_id: str, attempt: int, events: Any, checkpoint: Any, **kw: Any) -> Any:
                if checkpoint is not None and checkpoint.pending:
                    # The write of the turn asking for the tool is slow: plenty of loop turns for
                    # anything that does not wait for it (a tool) to run first.
                    for _ in range(50):
                        await asyncio.sleep(0)
                    await p.crash.checkpoint()  # a replica killed meanwhile never gets it written
                return await real(run_id, attempt, events, checkpoint, **kw)

            intercept(p.a.store, "record_progress", progress)
            run_id = await p.create(session="sessions/pay")
            await killed.wait()
            await p.take_over()
            events = await watch(p.b.client, run_id)

            assert all(s.durable for s in book.starts), [(s.label, s.durable) for s in book.starts]
            assert kinds(events)[-1] == "run_completed", kinds(events)
            (called,) = one_turn_per_kind(events, "tool_called")
            call_id = called.item.tool_call.call_id
            assert [s.call_id for s in book.starts] == [call_id, call_id]  # a's, then b's: the same call
            assert model_requests(model_server) == 2  # the turn that asked for the tool is never asked again
            names = kinds(events)
            assert names.count("run_started") == 1
            resumed = one_turn_per_kind(events, "run_resumed")
            assert [(r.attempt, r.reason) for r in resumed] == [(2, "lease expired")]
            assert names.index("tool_called") < names.index("run_resumed") < names.index("tool_output")
            assert [o.item.tool_result.call_id for o in one_turn_per_kind(events, "tool_output")] == [call_id]
            items = await p.b.client.all_items("pay")
            assert [i.WhichOneof("content") for i in items] == ["message", "tool_call", "tool_result", "message"]
            assert items[1].tool_call.call_id == items[2].tool_result.call_id == call_id
        finally:
            await close(p)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_tool_that_finished_before_the_crash_is_not_run_again(engine, model_server, tmp_path):
    """Two calls in one turn: one finished on the dead replica (its tool_output is in the log), the
    other was still running. The resumed run keeps the first's output and runs only the second."""
    book = reset_book()
    model_server.set_script(MODEL, Script.of(
        calls(call("act", label="fast"), call("act", label="slow")), say("both done"),
    ))
    async with shared_stores(engine, sessions=True) as stores:
        p = await pair(model_server, tmp_path, stores)
        try:
            book.hold = {"slow"}
            killed = asyncio.Event()

            async def progress(real: Any, run_id: str, attempt: int, events: Any, checkpoint: Any, **kw: Any) -> Any:
                reply = await real(run_id, attempt, events, checkpoint, **kw)
                if any(isinstance(e.payload, ToolOutput) for e in events):
                    p.crash.kill()  # dies right after "fast"'s output became durable
                    killed.set()
                return reply

            intercept(p.a.store, "record_progress", progress)
            run_id = await p.create(session="sessions/two")
            await killed.wait()
            await p.take_over()
            events = await watch(p.b.client, run_id)

            assert kinds(events)[-1] == "run_completed", kinds(events)
            calls_ = {c.item.tool_call.arguments["label"]: c.item.tool_call.call_id
                      for c in one_turn_per_kind(events, "tool_called")}
            fast_id, slow_id = calls_["fast"], calls_["slow"]
            assert [s.call_id for s in book.starts_of("fast")] == [fast_id]  # once, on a
            assert [s.call_id for s in book.starts_of("slow")] == [slow_id, slow_id]  # a's, then b's
            names = kinds(events)
            outputs = [o.item.tool_result.call_id for o in one_turn_per_kind(events, "tool_output")]
            assert outputs == [fast_id, slow_id]  # one tool_output per call
            assert names.count("run_started") == 1 and names.count("run_resumed") == 1
            first_output = names.index("tool_output")
            assert first_output < names.index("run_resumed") < len(names) - 1 - names[::-1].index("tool_output")
            # The session holds the step once, with the output the dead replica's tool produced.
            items = await p.b.client.all_items("two")
            assert [i.WhichOneof("content") for i in items] == [
                "message", "tool_call", "tool_call", "tool_result", "tool_result", "message",
            ]
            results = {
                i.tool_result.call_id: i.tool_result.output for i in items if i.WhichOneof("content") == "tool_result"
            }
            assert results == {fast_id: "fast done", slow_id: "slow done"}
        finally:
            await close(p)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_run_resumed_before_its_first_checkpoint_starts_only_once(engine, model_server, tmp_path):
    model_server.set_script(MODEL, Script.of(say("hello there", delay_s=0.05)))
    reset_book()
    async with shared_stores(engine) as stores:
        p = await pair(model_server, tmp_path, stores)
        try:
            killed = asyncio.Event()

            async def progress(real: Any, run_id: str, attempt: int, events: Any, checkpoint: Any, **kw: Any) -> Any:
                reply = await real(run_id, attempt, events, checkpoint, **kw)
                if any(isinstance(e.payload, RunStarted) for e in events):
                    p.crash.kill()  # dies with run_started durable, before any checkpoint
                    killed.set()
                return reply

            intercept(p.a.store, "record_progress", progress)
            run_id = await p.create()
            await killed.wait()
            await p.take_over()
            events = await watch(p.b.client, run_id)
            names = kinds(events)
            assert names[0] == "run_started" and names.count("run_started") == 1, names
            assert names[1] == "run_resumed" and names[-1] == "run_completed", names
            assert events[1].run_resumed.reason == "lease expired" and events[1].run_resumed.attempt == 2
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        finally:
            await close(p)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_run_handed_off_by_a_draining_replica_says_so(engine, model_server, tmp_path):
    book = reset_book()
    model_server.set_script(MODEL, Script.of(calls(call("act", label="long")), say("done")))
    async with shared_stores(engine) as stores:
        p = await pair(model_server, tmp_path, stores)
        a_stopped = False
        try:
            book.hold = {"long"}
            run_id = await p.create()
            await book.started.wait()
            a_stopped = True
            await p.a.server.stop(grace_s=0)  # drain: the run is handed off at once
            events = await watch(p.b.client, run_id)
            resumed = one_turn_per_kind(events, "run_resumed")
            assert [(r.attempt, r.reason) for r in resumed] == [(2, "handed off")]
            assert kinds(events)[-1] == "run_completed"
            (called,) = one_turn_per_kind(events, "tool_called")
            assert [s.call_id for s in book.starts] == [called.item.tool_call.call_id] * 2
        finally:
            p.crash.end()
            await stop_replica(p.b)
            if a_stopped:
                await p.a.client.close()
            else:
                await stop_replica(p.a)
