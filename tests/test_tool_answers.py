"""Answers to a waiting run over the real wire: SubmitToolOutputs and ApproveToolCall are
exactly idempotent.

A retry of an answer the run already has (its reply was lost, or two copies raced) is OK
with the run, from any replica, even after the run moved on to its next turn or ended; a
different answer for an answered call, or an answer for a call the run does not wait for,
is FAILED_PRECONDITION in the caller's terms. The run uses each answer once. Everything
synchronises on the run's events (no sleeps).
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest

from agentd.client import AgentdClient
from agentd.server import Script, call, calls, say
from agentd.server.runs.records import RunStatus
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as pb
from tests.conftest import Harness, start_harness
from tests.race_util import shared_stores
from tests.runs_util import assert_well_formed, kinds, outcome, wait_for_actions

# Turn 1 asks for a caller-executed lookup and an approval; turn 2 for another approval.
SCRIPT = Script.of(
    calls(call("lookup_customer", customer_id="c-7"), call("issue_refund", order_id="A-1", amount_eur=5)),
    calls(call("issue_refund", order_id="A-2", amount_eur=7)),
    say("Refunds handled."),
)
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@asynccontextmanager
async def replicas(
    engine: str, model: ScriptedOpenAIServer, tmp_path: Path, count: int
) -> AsyncIterator[list[Harness]]:
    """``count`` servers whose runs live on ``engine`` (one namespace, shared), each with its own sessions."""
    async with shared_stores(engine) as shared:
        started: list[Harness] = []
        try:
            for n in range(count):
                name = f"replica-{n}"
                started.append(await start_harness(model, tmp_path, sqlite_path=tmp_path / f"{name}.db",
                                                   replica_id=name, **shared))
            yield started
        finally:
            for h in started:
                await h.client.close()
                await h.server.stop(grace_s=0)


async def start_waiting(client: AgentdClient, model: ScriptedOpenAIServer) -> tuple[str, str, str, str]:
    """A run of the operator waiting for its first turn's answers: (run id, replica, lookup call, refund call)."""
    from tests.apps import refunds

    refunds.clear()
    model.set_script("operator", SCRIPT)
    run = await client.create_run("operator", "refund A-1 and A-2 for c-7")
    run_id = run.name.removeprefix("runs/")
    asked = dict(await wait_for_actions(client, run_id, 2))
    return run_id, run.replica, asked["lookup_customer"], asked["issue_refund"]


async def rejected(call) -> str:
    code, details = await outcome(call)
    assert code == FAILED_PRECONDITION, (code, details)
    assert "output:" not in details and "approval:" not in details, details
    return details


async def finished(client: AgentdClient, run_id: str) -> list:
    events = [event async for event in client.watch_run(run_id)]
    assert_well_formed(events)
    return events


def assert_used_once(events: list, model: ScriptedOpenAIServer, lookup: str) -> None:
    """Each call has one result in the log; the model saw the lookup's output once, as sent."""
    from tests.apps import refunds

    assert kinds(events)[-1] == "run_completed" and kinds(events).count("action_required") == 3
    results = [e.tool_output.item.tool_result for e in events if e.WhichOneof("payload") == "tool_output"]
    assert len(results) == len({r.call_id for r in results}) == 3
    assert [(r.output, r.is_error) for r in results if r.call_id == lookup] == [("gold", False)]
    assert refunds == ["A-1", "A-2"]  # each approved call executed once
    last = [body for body in model.requests if body.get("model") == "operator"][-1]
    answers = [m for m in last["messages"] if m.get("role") == "tool" and m.get("tool_call_id") == lookup]
    assert [m["content"] for m in answers] == ["gold"]


@pytest.mark.parametrize("engine", ["memory", "redis", "postgres"])
async def test_retried_answers_are_ok_and_used_once(engine: str, model_server, tmp_path) -> None:
    async with replicas(engine, model_server, tmp_path, 1) as (h,):
        client = h.client
        run_id, _, lookup, refund = await start_waiting(client, model_server)

        # Two copies at once (a retry racing the original): both OK, whichever lands first.
        sent = await asyncio.gather(client.submit_tool_output(run_id, lookup, "gold"),
                                    client.submit_tool_output(run_id, lookup, "gold"))
        assert all(run.name == f"runs/{run_id}" for run in sent)
        await client.submit_tool_output(run_id, lookup, "gold")  # a retry after a lost reply
        await asyncio.gather(client.approve_tool_call(run_id, refund, True),
                             client.approve_tool_call(run_id, refund, True, reason="retried"))

        # The run used both answers and waits for the next turn's approval: repeats are still OK.
        (_, next_refund) = (await wait_for_actions(client, run_id, 3))[2]
        again = await client.submit_tool_output(run_id, lookup, "gold")
        assert [a.item.tool_call.call_id for a in again.required_actions] == [next_refund]
        assert (await client.approve_tool_call(run_id, refund, True)).status == pb.RUN_STATUS_REQUIRES_ACTION

        # A different answer for an answered call names the call and the answer it has.
        details = await rejected(client.submit_tool_output(run_id, lookup, "silver"))
        assert f"already has a tool output for call {lookup!r}: 'gold'" in details
        details = await rejected(client.submit_tool_output(run_id, lookup, "gold", is_error=True))
        assert f"call {lookup!r}" in details
        details = await rejected(client.approve_tool_call(run_id, refund, False))
        assert f"call {refund!r}" in details and "approved" in details
        # An unknown call, or the wrong kind of answer, names what the run waits for.
        details = await rejected(client.submit_tool_output(run_id, "nope", "x"))
        assert details == (f"run {run_id} is not waiting for call 'nope'; it waits for an approval for call "
                           f"{next_refund!r}")
        details = await rejected(client.submit_tool_output(run_id, next_refund, "x"))
        assert details.startswith(f"run {run_id} is not waiting for a tool output for call {next_refund!r}")

        await client.approve_tool_call(run_id, next_refund, True)
        events = await finished(client, run_id)
        assert_used_once(events, model_server, lookup)

        # Ended: a repeat of a recorded answer is still OK (the run as it ended), anything else is not.
        done = await client.approve_tool_call(run_id, next_refund, True)
        assert done.status == pb.RUN_STATUS_COMPLETED
        assert (await client.submit_tool_output(run_id, lookup, "gold")).status == pb.RUN_STATUS_COMPLETED
        details = await rejected(client.approve_tool_call(run_id, next_refund, False))
        assert "approved" in details and "ended" in details
        details = await rejected(client.submit_tool_output(run_id, "nope", "x"))
        assert "has ended (completed)" in details


@pytest.mark.parametrize("engine", ["redis", "postgres"])
async def test_a_retry_sent_to_another_replica_is_ok(engine: str, model_server, tmp_path) -> None:
    async with replicas(engine, model_server, tmp_path, 2) as (a, b):
        run_id, executing, lookup, refund = await start_waiting(a.client, model_server)
        assert executing == "replica-0"  # created on a, which executes it: b only reaches its store

        # The same answer at once through both replicas, then retried on the other one.
        await asyncio.gather(a.client.submit_tool_output(run_id, lookup, "gold"),
                             b.client.submit_tool_output(run_id, lookup, "gold"))
        await b.client.approve_tool_call(run_id, refund, True)
        await a.client.approve_tool_call(run_id, refund, True)

        (_, next_refund) = (await wait_for_actions(b.client, run_id, 3))[2]
        await b.client.submit_tool_output(run_id, lookup, "gold")
        await b.client.approve_tool_call(run_id, refund, True)
        details = await rejected(b.client.submit_tool_output(run_id, lookup, "silver"))
        assert f"call {lookup!r}" in details
        details = await rejected(b.client.approve_tool_call(run_id, "nope", True))
        assert details == (f"run {run_id} is not waiting for call 'nope'; it waits for an approval for call "
                           f"{next_refund!r}")

        await b.client.approve_tool_call(run_id, next_refund, True)  # reaches the run on a
        events = await finished(b.client, run_id)
        assert_used_once(events, model_server, lookup)
        assert (await b.client.approve_tool_call(run_id, next_refund, True)).status == pb.RUN_STATUS_COMPLETED
        assert (await a.client.approve_tool_call(run_id, next_refund, True)).status == pb.RUN_STATUS_COMPLETED


async def test_redis_reads_the_checkpoint_when_its_awaiting_field_is_missing_or_stale() -> None:
    """A checkpoint written by an older replica has no ``awaiting`` field, or leaves the one of an
    earlier checkpoint: the answer script then reads what the run waits for from the checkpoint."""
    from redis.asyncio import Redis

    from agentd.server.runs import codec
    from tests.backends_redis import REDIS_URL
    from tests.backends_runs_redis import redis_run_replicas
    from tests.test_run_stores import OUT1, OUT3, refusal, waiting, waiting_run

    raw = Redis.from_url(REDIS_URL)
    try:
        async with redis_run_replicas() as replica:
            one, two, s = await waiting_run(replica, OUT1)
            run_key = one.key_base.encode() + b"run:" + s.run_id.encode()
            field = await raw.hget(run_key, b"awaiting")
            assert field == b"%d:%s" % (await raw.hstrlen(run_key, b"checkpoint"), json.dumps([OUT1]).encode())
            await raw.hdel(run_key, b"awaiting")
            output = {"output": "1", "is_error": False}
            taken = await two.submit_answers(s.run_id, [(OUT1, output)], now=time.time())
            assert taken is not None and taken.recorded == (OUT1,)

            # An older replica writes the next checkpoint (it waits for call_3 and call_4) and
            # leaves the field of the previous one.
            await raw.hset(run_key, b"awaiting", field)
            later = codec.encode_checkpoint(waiting((OUT3, "approval:call_4"), sequence=1))
            await raw.hset(run_key, b"checkpoint", later.encode())
            error = await refusal(two.submit_answers(s.run_id, [("output:call_9", output)], now=time.time()))
            assert error.reason == "RUN_NOT_WAITING" and error.waiting_for == ["call_3", "call_4"]
            taken = await two.submit_answers(s.run_id, [(OUT3, output)], now=time.time())
            assert taken is not None and taken.recorded == (OUT3,) and taken.record.status is RunStatus.RUNNING
    finally:
        await raw.aclose()
