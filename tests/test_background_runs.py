"""Runs as resources over the real wire: CreateRun, GetRun, ListRuns, CancelRun, WatchRun,
session policies and request ids, on each run store engine."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
import pytest

from agentd.server import Script, call, calls, say
from agentd.v1 import agent_service_pb2 as pb
from agentd.v1 import run_event_pb2
from tests.apps import tool_log
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix
from tests.conftest import Harness, start_harness
from tests.runs_util import assert_well_formed, kinds

T = TypeVar("T")

ENGINES = ("memory", "redis", "postgres")


@asynccontextmanager
async def engine_harness(engine: str, model_server, tmp_path, **settings: object) -> AsyncIterator[Harness]:
    """A server whose runs live on ``engine`` (sessions on SQLite), cleaned up afterwards."""
    namespace = new_prefix() if engine == "redis" else new_schema()
    extra: dict[str, object] = {"run_store": engine}
    if engine == "redis":
        extra.update(redis_url=REDIS_URL, redis_prefix=namespace)
    elif engine == "postgres":
        extra.update(postgres_url=POSTGRES_URL, postgres_schema=namespace)
    try:
        async with dropped_afterwards(namespace) if engine == "postgres" else _nothing():
            h = await start_harness(model_server, tmp_path, **extra, **settings)
            try:
                yield h
            finally:
                await h.client.close()
                await h.server.stop(grace_s=0)
    finally:
        if engine == "redis":
            await delete_prefix(namespace)


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


@pytest.fixture(params=ENGINES)
async def h(request, model_server, tmp_path) -> AsyncIterator[Harness]:
    async with engine_harness(request.param, model_server, tmp_path) as harness:
        yield harness


GUARD_S = 60.0  # how long a test waits before it calls a wait a hang: a bound on a failure, never a latency
FOREVER_S = 3600.0  # a duration nothing in a test may wait out


async def guarded(awaitable: Awaitable[T], what: str, guard_s: float = GUARD_S) -> T:
    """``awaitable``'s result; fails the test, naming ``what``, if it has not come within ``guard_s``."""
    try:
        async with asyncio.timeout(guard_s) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            pytest.fail(f"{what}: still waiting after {guard_s:g}s (a hang)", pytrace=False)
        raise


async def eventually(check: Callable[[], bool], what: str, guard_s: float = GUARD_S) -> None:
    """Return once ``check()`` is true (a state nothing announces); fail, naming ``what``, after ``guard_s``."""

    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await guarded(poll(), what, guard_s)


def start(input: str = "hi", **fields: object) -> pb.StartRun:
    return pb.StartRun(agent="agents/assistant", input=input, **fields)  # type: ignore[arg-type]


async def watch(h: Harness, run_id: str, after: int = 0) -> list:
    call = h.client.agents.WatchRun(pb.WatchRunRequest(name=f"runs/{run_id}", after_sequence=after))
    return [response.event async for response in call]


async def wait_status(h: Harness, run_id: str, status: int, timeout_s: float = 5.0) -> pb.RunInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        run = (await h.client.agents.GetRun(pb.GetRunRequest(name=f"runs/{run_id}"))).run
        if run.status == status or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.02)


async def test_background_run_lifecycle(h: Harness) -> None:
    h.model.set_script("assistant", Script.of(
        calls(call("get_weather", city="Paris"), delay_s=0.2), say("Sunny in Paris."),
    ))
    created = (await h.client.agents.CreateRun(pb.CreateRunRequest(start=start(session="sessions/bg")))).run
    run_id = created.name.removeprefix("runs/")
    assert created.status in (pb.RUN_STATUS_QUEUED, pb.RUN_STATUS_RUNNING)
    assert created.agent == "agents/assistant" and created.session == "sessions/bg"
    running = await wait_status(h, run_id, pb.RUN_STATUS_RUNNING)
    assert running.replica == h.server.runs.replica_id and running.attempt == 1
    events = await watch(h, run_id)
    assert_well_formed(events)
    done = await wait_status(h, run_id, pb.RUN_STATUS_COMPLETED)
    assert done.completed.final_output.string_value == "Sunny in Paris."
    assert done.last_sequence == events[-1].sequence and done.replica == ""
    # Replaying from any point gives exactly the rest of the log.
    for after in (0, 3, len(events) - 1, len(events)):
        assert await watch(h, run_id, after) == events[after:]
    listed = (await h.client.agents.ListRuns(pb.ListRunsRequest(session="sessions/bg"))).runs
    assert [r.name for r in listed] == [created.name]


async def test_watch_after_the_end_returns_nothing_but_ok(h: Harness) -> None:
    h.model.set_script("assistant", Script.of(say("done")))
    run_id = (await h.client.agents.CreateRun(pb.CreateRunRequest(start=start()))).run.name.removeprefix("runs/")
    events = await watch(h, run_id)
    assert kinds(events)[-1] == "run_completed"
    assert await watch(h, run_id, events[-1].sequence) == []


async def test_create_run_with_a_request_id_is_idempotent(h: Harness) -> None:
    h.model.set_script("assistant", Script.of(say("once")))
    first = (await h.client.agents.CreateRun(pb.CreateRunRequest(start=start(request_id="job-1")))).run
    again = (await h.client.agents.CreateRun(pb.CreateRunRequest(start=start(request_id="job-1")))).run
    assert again.name == first.name
    await watch(h, first.name.removeprefix("runs/"))
    after_end = (await h.client.agents.CreateRun(pb.CreateRunRequest(start=start(request_id="job-1")))).run
    assert after_end.name == first.name and after_end.status == pb.RUN_STATUS_COMPLETED
    # A stream start with a known request id is refused rather than run twice.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in h.client.agents.StreamRun(pb.StreamRunRequest(start=start(request_id="job-1"))):
            pass
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.name.removeprefix("runs/") in caught.value.details() and "WatchRun" in caught.value.details()


async def test_session_policy_reject_and_enqueue(h: Harness) -> None:
    h.model.set_script("assistant", Script.of(say("first done", delay_s=0.4)))
    first = (await h.client.agents.CreateRun(pb.CreateRunRequest(start=start("one", session="sessions/p")))).run
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.client.agents.CreateRun(pb.CreateRunRequest(start=start("two", session="sessions/p")))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert first.name.removeprefix("runs/") in caught.value.details() and "ENQUEUE" in caught.value.details()
    queued = (await h.client.agents.CreateRun(pb.CreateRunRequest(
        start=start("two", session="sessions/p", session_policy=pb.SESSION_POLICY_ENQUEUE)))).run
    assert queued.status == pb.RUN_STATUS_QUEUED
    first_events = await watch(h, first.name.removeprefix("runs/"))
    second_events = await watch(h, queued.name.removeprefix("runs/"))
    # The queued run started after the first ended, and read its items as history.
    assert first_events[-1].create_time.ToNanoseconds() <= second_events[0].create_time.ToNanoseconds()
    assert second_events[0].run_started.history_items == 2
    items = await h.client.all_items("p")
    assert [i.message.text for i in items if i.HasField("message")] == ["one", "first done", "two", "first done"]


@pytest.mark.parametrize("engine", ENGINES)
async def test_cancel_a_running_and_a_queued_run(engine: str, model_server, tmp_path) -> None:
    """A queued run is cancelled where it waits; a running one is stopped in the middle of its
    tool. The tool would run for an hour, the tool timeout and the lease (whose renewal also
    delivers cancels) are an hour too: only the cancel itself can end the run before the guard."""
    tool_log.clear()
    async with engine_harness(engine, model_server, tmp_path, tool_timeout_s=FOREVER_S, run_lease_s=FOREVER_S) as h:
        await _cancel_a_running_and_a_queued_run(h)


async def _cancel_a_running_and_a_queued_run(h: Harness) -> None:
    h.model.set_script("assistant", Script.of(calls(call("wait", seconds=FOREVER_S, label="slow")), say("never")))
    running = (await h.client.agents.CreateRun(pb.CreateRunRequest(start=start("a", session="sessions/c")))).run
    queued = (await h.client.agents.CreateRun(pb.CreateRunRequest(
        start=start("b", session="sessions/c", session_policy=pb.SESSION_POLICY_ENQUEUE)))).run
    running_id, queued_id = running.name.removeprefix("runs/"), queued.name.removeprefix("runs/")
    await wait_status(h, running_id, pb.RUN_STATUS_RUNNING)
    cancelled = (await h.client.agents.CancelRun(pb.CancelRunRequest(name=queued.name, reason="not needed"))).run
    assert cancelled.status == pb.RUN_STATUS_CANCELLED and cancelled.cancelled.reason == "not needed"
    assert kinds(await watch(h, queued_id)) == ["run_cancelled"]
    await eventually(lambda: "slow" in tool_log.started, "the tool never started")
    await h.client.agents.CancelRun(pb.CancelRunRequest(name=running.name, reason="stop"))
    events = await guarded(watch(h, running_id), "the cancelled run never ended")
    assert events[-1].run_cancelled.reason == "stop"
    assert (tool_log.cancelled, tool_log.finished) == (["slow"], [])  # stopped in the middle of the tool
    final = await wait_status(h, running_id, pb.RUN_STATUS_CANCELLED)
    assert final.cancelled.reason == "stop"
    # Cancelling an ended run changes nothing.
    again = (await h.client.agents.CancelRun(pb.CancelRunRequest(name=running.name, reason="again"))).run
    assert again.cancelled.reason == "stop"


async def test_bad_requests_name_the_problem(h: Harness) -> None:
    agents = h.client.agents
    cases = [
        (agents.GetRun(pb.GetRunRequest(name="runs/run_nope")), grpc.StatusCode.NOT_FOUND, "run_nope"),
        (agents.GetRun(pb.GetRunRequest(name="")), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (agents.CancelRun(pb.CancelRunRequest(name="runs/run_nope")), grpc.StatusCode.NOT_FOUND, "run_nope"),
        (agents.ListRuns(pb.ListRunsRequest()), grpc.StatusCode.INVALID_ARGUMENT, "session"),
        (agents.ListRuns(pb.ListRunsRequest(session="sessions/x", page_token="garbage")),
         grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
        (agents.CreateRun(pb.CreateRunRequest(start=start(""))), grpc.StatusCode.INVALID_ARGUMENT, "start.input"),
        (agents.CreateRun(pb.CreateRunRequest(start=pb.StartRun(agent="agents/nobody", input="x"))),
         grpc.StatusCode.NOT_FOUND, "nobody"),
        (agents.CreateRun(pb.CreateRunRequest(start=start(session_policy=7))), grpc.StatusCode.INVALID_ARGUMENT,
         "session_policy"),
    ]
    for call_, code, fragment in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_
        assert caught.value.code() == code and fragment in caught.value.details(), caught.value.details()
    for request, code in ((pb.WatchRunRequest(name="runs/run_nope"), grpc.StatusCode.NOT_FOUND),
                          (pb.WatchRunRequest(name="runs/x", after_sequence=-1), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in agents.WatchRun(request):
                pass
        assert caught.value.code() == code


async def test_list_runs_pages(h: Harness) -> None:
    h.model.set_script("assistant", Script.of(say("ok")))
    names = []
    for i in range(5):
        run = (await h.client.agents.CreateRun(pb.CreateRunRequest(
            start=start(f"n{i}", session="sessions/pages", session_policy=pb.SESSION_POLICY_ENQUEUE)))).run
        names.append(run.name)
    seen, token = [], ""
    while True:
        page = await h.client.agents.ListRuns(pb.ListRunsRequest(session="sessions/pages", page_size=2,
                                                                  page_token=token))
        seen += [r.name for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == names[::-1]


async def test_detached_stream_survives_its_caller(h: Harness) -> None:
    h.model.set_script("assistant", Script.of(calls(call("wait", seconds=0.3, label="x")), say("kept going")))
    call_ = h.client.agents.StreamRun(pb.StreamRunRequest(start=start(detached=True)))
    first = await anext(aiter(call_))
    call_.cancel()
    events = await watch(h, first.event.run_id)
    assert events[-1].run_completed.final_output.string_value == "kept going"
    assert events[0].sequence == 1


OPERATOR_SCRIPT = Script.of(
    calls(call("lookup_customer", customer_id="c-7"), call("issue_refund", order_id="A-1", amount_eur=5)),
    say("Refund handled."),
)


async def wait_for(h: Harness, run_id: str, predicate, timeout_s: float = 5.0) -> pb.RunInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        run = (await h.client.agents.GetRun(pb.GetRunRequest(name=f"runs/{run_id}"))).run
        if predicate(run):
            return run
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("approved", [True, False])
async def test_caller_executed_tool_and_approval(h: Harness, approved: bool) -> None:
    from tests.apps import refunds

    refunds.clear()
    h.model.set_script("operator", OPERATOR_SCRIPT)
    run = (await h.client.agents.CreateRun(pb.CreateRunRequest(
        start=pb.StartRun(agent="agents/operator", input="refund A-1 for c-7")))).run
    run_id = run.name.removeprefix("runs/")
    waiting = await wait_for(h, run_id, lambda r: len(r.required_actions) == 2)
    assert waiting.status == pb.RUN_STATUS_REQUIRES_ACTION
    asked = {a.item.tool_call.tool_name: a for a in waiting.required_actions}
    assert asked["lookup_customer"].action == run_event_pb2.REQUIRED_ACTION_TOOL_OUTPUT
    assert asked["issue_refund"].action == run_event_pb2.REQUIRED_ACTION_APPROVAL
    lookup_id = asked["lookup_customer"].item.tool_call.call_id
    refund_id = asked["issue_refund"].item.tool_call.call_id
    assert refunds == []  # nothing executes before its approval

    # Answers for calls the run does not wait for are refused, naming what it waits for.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.client.agents.SubmitToolOutputs(pb.SubmitToolOutputsRequest(
            name=run.name, outputs=[pb.ToolOutputSubmission(call_id=refund_id, output="x")]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and lookup_id in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.client.agents.SubmitToolOutputs(pb.SubmitToolOutputsRequest(name=run.name))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    await h.client.agents.SubmitToolOutputs(pb.SubmitToolOutputsRequest(
        name=run.name, outputs=[pb.ToolOutputSubmission(call_id=lookup_id, output='{"tier": "gold"}')]))
    # A retried answer is harmless (OK, nothing changes); a different one is refused: the first stands.
    await h.client.agents.SubmitToolOutputs(pb.SubmitToolOutputsRequest(
        name=run.name, outputs=[pb.ToolOutputSubmission(call_id=lookup_id, output='{"tier": "gold"}')]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.client.agents.SubmitToolOutputs(pb.SubmitToolOutputsRequest(
            name=run.name, outputs=[pb.ToolOutputSubmission(call_id=lookup_id, output="changed")]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "gold" in caught.value.details()
    still = await wait_for(h, run_id, lambda r: len(r.required_actions) == 1)
    assert still.status == pb.RUN_STATUS_REQUIRES_ACTION
    await h.client.agents.ApproveToolCall(pb.ApproveToolCallRequest(
        name=run.name, approval=pb.ToolApproval(call_id=refund_id, approved=approved, reason="over budget")))

    events = await watch(h, run_id)
    assert_well_formed(events)
    assert kinds(events).count("action_required") == 2
    outputs = {e.tool_output.item.tool_result.tool_name: e.tool_output.item.tool_result
               for e in events if e.WhichOneof("payload") == "tool_output"}
    assert outputs["lookup_customer"].output == '{"tier": "gold"}' and not outputs["lookup_customer"].is_error
    if approved:
        assert outputs["issue_refund"].output == "refunded 5.00 EUR for A-1" and refunds == ["A-1"]
    else:
        assert outputs["issue_refund"].is_error and "over budget" in outputs["issue_refund"].output
        assert refunds == []
    done = await wait_status(h, run_id, pb.RUN_STATUS_COMPLETED)
    assert not done.required_actions
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.client.agents.ApproveToolCall(pb.ApproveToolCallRequest(
            name=run.name, approval=pb.ToolApproval(call_id=refund_id, approved=not approved)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "ended" in caught.value.details()


async def test_answers_on_the_run_stream(h: Harness) -> None:
    h.model.set_script("operator", OPERATOR_SCRIPT)
    call_ = h.client.agents.Run()
    await call_.write(pb.RunRequest(start=pb.StartRun(agent="agents/operator", input="refund")))
    events = []
    async for response in call_:
        event = response.event
        events.append(event)
        if event.WhichOneof("payload") == "action_required":
            tool_call = event.action_required.item.tool_call
            if event.action_required.action == run_event_pb2.REQUIRED_ACTION_TOOL_OUTPUT:
                await call_.write(pb.RunRequest(tool_outputs=pb.ToolOutputs(
                    outputs=[pb.ToolOutputSubmission(call_id=tool_call.call_id, output="gold customer")])))
            else:
                await call_.write(pb.RunRequest(approval=pb.ToolApproval(call_id=tool_call.call_id, approved=True)))
        if event.WhichOneof("payload") in ("run_completed", "run_failed", "run_cancelled"):
            break
    await call_.done_writing()
    assert events[-1].run_completed.final_output.string_value == "Refund handled."


@pytest.mark.parametrize("engine", ["redis", "postgres"])
async def test_a_cancel_sent_to_a_dead_replica_still_ends_the_run(engine, model_server, tmp_path) -> None:
    """The cancel is recorded on the run: the replica that takes the run over ends it at once."""
    from agentd.server.runs.records import SessionPolicy
    from agentd.server.runtime.run_loop import RunInput

    model_server.set_script("assistant", Script.of(calls(call("wait", seconds=10, label="x")), say("never")))
    async with engine_harness(engine, model_server, tmp_path, run_lease_s=1.0) as harness:
        store = harness.server.runs.store
        spec = RunInput(run_id="run_ghost_" + engine, agent="assistant", input="hi")
        # A run another replica started and then died with (it never renews its lease).
        await store.create_run(spec, policy=SessionPolicy.REJECT, owner="ghost", lease_s=1.0, max_queued=10,
                               now=time.time())
        info = (await harness.client.agents.CancelRun(pb.CancelRunRequest(name=f"runs/{spec.run_id}",
                                                                          reason="stop ghost"))).run
        assert info.status == pb.RUN_STATUS_RUNNING and info.replica == "ghost"
        events = await asyncio.wait_for(watch(harness, spec.run_id), 10)
        assert events[-1].run_cancelled.reason == "stop ghost"
        done = await wait_status(harness, spec.run_id, pb.RUN_STATUS_CANCELLED)
        assert done.attempt == 2 and done.cancelled.reason == "stop ghost"
