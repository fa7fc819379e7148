"""Scale-out with real processes: three ``agentd serve`` replicas sharing Postgres and Redis.

A replica is killed with SIGKILL mid-run, drained with SIGTERM, cancelled from another
replica, and streams are resumed on a different replica than the one that started them.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from agentd.client import AgentdClient
from agentd.server import Script, call, calls, say
from agentd.v1 import agent_service_pb2 as pb
from tests.cluster import cluster
from tests.conftest import start_harness
from tests.runs_util import TERMINAL, kinds, wait_for_actions

# Three model turns of ~0.3 s each, with a tool call in between: long enough to kill a replica mid-run.
SCRIPT = Script.of(
    calls(call("get_weather", city="Paris"), delay_s=0.3),
    calls(call("wait", seconds=0.2, label="check")),
    say("Paris is clear at 21 degrees.", delay_s=0.3),
)


def assert_gap_free(events: list) -> None:
    """Sequence 1..N, each once, in order; exactly one terminal event, last."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), [e.sequence for e in events]
    names = kinds(events)
    assert names[-1] in TERMINAL and sum(n in TERMINAL for n in names) == 1, names


def transcript(items: list) -> list:
    """Session items without call ids (a turn redone after a takeover asks the model again)."""
    out = []
    for item in items:
        kind = item.WhichOneof("content")
        body = getattr(item, kind)
        if kind == "message":
            out.append((kind, body.role, body.text))
        elif kind == "tool_call":
            out.append((kind, body.tool_name, body.arguments))
        else:
            out.append((kind, body.tool_name, body.output.split(" at ")[0], body.is_error))
    return out


async def baseline(model_server, tmp_path) -> tuple[str, list]:
    """What one replica on its own produces for the script: final output and session transcript."""
    h = await start_harness(model_server, tmp_path / "baseline", store="memory")
    try:
        output = await h.client.run_final_output("assistant", "weather?", session_id="base")
        return output, transcript(await h.client.all_items("base"))
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def watch_all(client: AgentdClient, run_id: str, after: int = 0) -> list:
    return [event async for event in client.watch_run(run_id, after_sequence=after)]


@pytest.mark.parametrize("run_store", ["redis", "postgres"])
async def test_runs_survive_a_replica_killed_mid_run(model_server, tmp_path, run_store: str) -> None:
    model_server.set_script("assistant", SCRIPT)
    expected_output, expected_items = await baseline(model_server, tmp_path)
    async with cluster(model_server, tmp_path, replicas=3, run_lease_s=1.5, run_store=run_store) as c:
        async with c.client() as client:
            # round_robin spreads calls over the replicas it is connected to: let it connect to all three.
            for _ in range(6):
                await client.list_agents()
            await asyncio.sleep(0.3)
            created = await asyncio.gather(*(
                client.create_run("assistant", "weather?", session_id=f"s{i}") for i in range(50)
            ))
            # Streams through the balancing client too: those on the killed replica resume elsewhere.
            streams = [client.run("assistant", "weather?", session_id=f"live{i}") for i in range(6)]
            streamed = [asyncio.create_task(_collect(s)) for s in streams]
            by_replica: dict[str, int] = {}
            for run in created:
                by_replica[run.replica] = by_replica.get(run.replica, 0) + 1
            assert set(by_replica) <= {r.name for r in c.replicas} and len(by_replica) >= 2, by_replica
            await asyncio.sleep(0.45)  # mid-run: first turn done, second under way
            victim = next(r for r in c.replicas if r.name == max(by_replica, key=by_replica.__getitem__))
            victim.kill()
            killed_at = time.perf_counter()
            await victim.process.wait()
            # The victim's runs that had not ended when it died: each must be taken over (one that
            # ended first, on a loaded machine, needs no takeover and shows none).
            ended = (pb.RUN_STATUS_COMPLETED, pb.RUN_STATUS_FAILED, pb.RUN_STATUS_CANCELLED)
            victims = [run for run in created if run.replica == victim.name]
            unfinished = {run.name for run in victims if (await client.get_run(run.name)).status not in ended}

            results = await asyncio.wait_for(
                asyncio.gather(*(watch_all(client, run.name.removeprefix("runs/")) for run in created)), 60
            )
            recovered_in = time.perf_counter() - killed_at
            live = await asyncio.wait_for(asyncio.gather(*streamed), 60)

            resumed = 0
            for run, events in zip(created, results):
                assert_gap_free(events)
                assert kinds(events)[-1] == "run_completed", (run.name, kinds(events), c.logs())
                assert events[-1].run_completed.final_output.string_value == expected_output
                if "run_resumed" in kinds(events):
                    resumed += 1
                elif run.name in unfinished:
                    raise AssertionError(f"{run.name} was running on the killed replica and never resumed")
            assert resumed >= len(unfinished), (by_replica, len(unfinished), resumed)
            for events in live:
                assert_gap_free(events)
                assert events[-1].run_completed.final_output.string_value == expected_output
            # Every session holds exactly the steps a single replica would have written: none lost, none twice.
            for i in range(50):
                assert transcript(await client.all_items(f"s{i}")) == expected_items, f"s{i}"
            infos = [await client.get_run(run.name.removeprefix("runs/")) for run in created]
            assert all(info.status == pb.RUN_STATUS_COMPLETED for info in infos)
            assert {info.attempt for info in infos} >= {2}
            print(f"\n50 runs + 6 streams, {by_replica} at creation; {resumed} resumed; "
                  f"all done {recovered_in:.2f}s after the kill")


async def _collect(stream) -> list:
    return [event async for event in stream]


async def test_a_dropped_stream_resumes_on_another_replica(model_server, tmp_path) -> None:
    model_server.set_script("assistant", SCRIPT)
    async with cluster(model_server, tmp_path, replicas=3) as c:
        a, b, d = (AgentdClient(r.target, resume=False) for r in c.replicas)
        try:
            for attempt in range(3):
                call_ = a.agents.StreamRun(pb.StreamRunRequest(start=pb.StartRun(
                    agent="agents/assistant", input="weather?", detached=True)))
                drop_after = random.randint(1, 12)
                seen = []
                async for response in call_:
                    seen.append(response.event)
                    if len(seen) == drop_after:
                        break
                call_.cancel()
                run_id = seen[0].run_id
                rest = await watch_all(b, run_id, after=seen[-1].sequence)
                whole = await watch_all(d, run_id)
                assert_gap_free(seen + rest)
                # Deterministic serialization: a Struct's keys may come in another order from the live
                # run than from the log (a map has no order), the event is the same.
                same = [e.SerializeToString(deterministic=True) for e in seen + rest]
                assert same == [e.SerializeToString(deterministic=True) for e in whole]
        finally:
            for client in (a, b, d):
                await client.close()


async def test_control_from_one_replica_reaches_a_run_on_another(model_server, tmp_path) -> None:
    """Cancel, tool outputs and approvals sent to replica 2 reach the run executing on replica 1."""
    model_server.set_script("assistant", Script.of(calls(call("wait", seconds=10, label="long")), say("never")))
    model_server.set_script("operator", Script.of(
        calls(call("lookup_customer", customer_id="c-7"), call("issue_refund", order_id="A-1", amount_eur=5)),
        say("Refund handled."),
    ))
    async with cluster(model_server, tmp_path, replicas=2) as c:
        a, b = (AgentdClient(r.target, resume=False) for r in c.replicas)
        try:
            # Caller-executed tool output and approval.
            run = await a.create_run("operator", "refund A-1")
            assert run.replica == c.replicas[0].name  # executes where it was created
            run_id = run.name.removeprefix("runs/")
            watching = asyncio.create_task(watch_all(b, run_id))
            # Both waits, from the run's events on replica 2 (no polling).
            calls_ = dict(await wait_for_actions(b, run_id, 2))
            await b.submit_tool_output(run_id, calls_["lookup_customer"], "gold")
            sent_ns = time.time_ns()
            await b.approve_tool_call(run_id, calls_["issue_refund"], approved=True)
            events = await asyncio.wait_for(watching, 5)
            assert events[-1].run_completed.final_output.string_value == "Refund handled."
            refund = next(e for e in events if e.WhichOneof("payload") == "tool_output"
                          and e.tool_output.item.tool_result.tool_name == "issue_refund")
            assert refund.tool_output.item.tool_result.output == "refunded 5.00 EUR for A-1"
            # A measurement, not an assertion (timed tests flake on a loaded machine).
            approval_ms = (refund.create_time.ToNanoseconds() - sent_ns) / 1e6

            # Cancel.
            run = await a.create_run("assistant", "wait")
            run_id = run.name.removeprefix("runs/")
            watching = asyncio.create_task(watch_all(b, run_id))
            await first_event(b, run_id, "tool_called")  # the tool is running on replica 1
            sent_ns = time.time_ns()
            info = await b.cancel_run(run_id, "stop from b")
            assert info.status in (pb.RUN_STATUS_RUNNING, pb.RUN_STATUS_CANCELLED)
            events = await asyncio.wait_for(watching, 5)
            assert events[-1].run_cancelled.reason == "stop from b"
            cancel_ms = (events[-1].create_time.ToNanoseconds() - sent_ns) / 1e6
            print(f"\nfrom replica 2 to the run on replica 1: approval {approval_ms:.1f} ms, cancel {cancel_ms:.1f} ms")
        finally:
            await a.close()
            await b.close()


# The drain must find every run mid-way: after its first tool, a run still has two model turns,
# the last one long, so no run can end within the drain however slow the machine is.
DRAIN_SCRIPT = Script.of(
    calls(call("get_weather", city="Paris")),
    calls(call("wait", seconds=0.2, label="check"), delay_s=0.3),
    say("Paris is clear at 21 degrees.", delay_s=2.0),
)


async def first_event(client: AgentdClient, run_id: str, kind: str) -> None:
    """Return once the run logged its first ``kind`` event (read from its event log, no polling)."""
    async for event in client.watch_run(run_id):
        if event.WhichOneof("payload") == kind:
            return
    raise AssertionError(f"run {run_id} ended before its first {kind}")


async def test_sigterm_hands_runs_to_the_other_replicas(model_server, tmp_path) -> None:
    model_server.set_script("assistant", DRAIN_SCRIPT)
    # A 30 s lease: if the drain did not hand runs off, they would wait for it to expire.
    async with cluster(model_server, tmp_path, replicas=3, run_lease_s=30, shutdown_grace_s=0.2) as c:
        draining = c.replicas[0]
        direct = AgentdClient(draining.target, resume=False)
        others = c.client(*c.replicas[1:])
        try:
            runs = [await direct.create_run("assistant", "weather?", session_id=f"d{i}") for i in range(8)]
            assert {r.replica for r in runs} == {draining.name}
            await asyncio.gather(*(first_event(direct, r.name.removeprefix("runs/"), "tool_output") for r in runs))
            draining.terminate()
            results = await asyncio.wait_for(
                asyncio.gather(*(watch_all(others, r.name.removeprefix("runs/")) for r in runs)), 20
            )
            # A hang guard, not a speed check: shutdown may take the drain (0.2 s) + 5 s for open
            # calls + up to 10 s of trace flush + 2 s of OTLP export (README, Scale-out).
            assert await asyncio.wait_for(draining.process.wait(), 30) == 0, draining.log()
            for events in results:
                assert_gap_free(events)
                assert kinds(events)[-1] == "run_completed"
                assert "run_resumed" in kinds(events)
                # The cause, as run_event.proto documents it.
                assert [e.run_resumed.reason for e in events if e.WhichOneof("payload") == "run_resumed"] == [
                    "handed off"
                ]
                assert kinds(events).count("run_started") == 1
            infos = [await others.get_run(r.name.removeprefix("runs/")) for r in runs]
            # Handed off at once, not taken over after the 30 s lease: "handed off", attempt 2.
            assert all(i.attempt == 2 for i in infos)
            assert "handed off" in draining.log()
        finally:
            await direct.close()
            await others.close()


@pytest.mark.parametrize("run_store", ["redis", "postgres"])
async def test_a_tool_that_finished_on_a_killed_replica_is_not_run_again(model_server, tmp_path, run_store) -> None:
    """SIGKILL once one of a turn's two tools has finished (its tool_output is durable) while the other
    still runs: the replica taking over keeps the finished one's output and reruns only the other,
    with the same call id. Each call has exactly one tool_output in the log."""
    model_server.set_script("assistant", Script.of(
        calls(call("wait", seconds=0.05, label="quick"), call("wait", seconds=3, label="slow")),
        say("Both done."),
    ))
    async with cluster(model_server, tmp_path, replicas=2, run_lease_s=1.0, run_store=run_store) as c:
        first, second = c.replicas
        a, b = AgentdClient(first.target, resume=False), AgentdClient(second.target, resume=False)
        try:
            run = await a.create_run("assistant", "two things", session_id="kill")
            assert run.replica == first.name
            run_id = run.name.removeprefix("runs/")
            events = []
            async for event in b.watch_run(run_id):  # durable events only, from the other replica
                events.append(event)
                if event.WhichOneof("payload") == "tool_output":
                    first.kill()  # "quick" is done and durable; "slow" is running, its step not saved
                    await first.process.wait()
                    break
            events += await asyncio.wait_for(watch_all(b, run_id, after=events[-1].sequence), 30)
            assert_gap_free(events)
            names = kinds(events)
            assert names[-1] == "run_completed", (names, c.logs())
            called = [e.tool_called.item.tool_call for e in events if e.WhichOneof("payload") == "tool_called"]
            outputs = [e.tool_output.item.tool_result for e in events if e.WhichOneof("payload") == "tool_output"]
            ids = {c_.arguments["label"]: c_.call_id for c_ in called}
            assert len(called) == 2, names  # the turn was durable: never asked of the model again
            assert sorted(o.call_id for o in outputs) == sorted(ids.values()), names  # one output per call
            assert names.count("run_started") == 1 and names.count("run_resumed") == 1
            resumed = names.index("run_resumed")
            assert outputs[0].call_id == ids["quick"] and names.index("tool_output") < resumed
            assert [e.run_resumed.reason for e in events if e.WhichOneof("payload") == "run_resumed"] == [
                "lease expired"
            ]
            items = await b.all_items("kill")
            results = {
                i.tool_result.call_id: i.tool_result.output for i in items if i.WhichOneof("content") == "tool_result"
            }
            assert set(results) == set(ids.values())
            assert results[ids["quick"]] == outputs[0].output  # the dead replica's result, kept
        finally:
            await a.close()
            await b.close()
