"""The client against several real replicas: round-robin, unary retries, run streams that survive breaks.

Real servers on loopback, the real wire, no mocked gRPC. Breaks are real too: a
``FaultProxy`` in front of a replica resets its connections (``cut``) or holds every
byte (``stall``). Replicas that must see the same runs share a Redis store (one
throwaway key prefix per test, deleted afterwards); Redis at 127.0.0.1:6379 is
required, as for the other Redis tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import AsyncIterator, Awaitable, TypeVar

import grpc

import agentd.client
import pytest

from agentd.client import AgentdClient, RunStreamError, RunStreamGapError, SyncAgentdClient
from agentd.client import _resume
from agentd.client._channel import RETRYABLE_METHODS, channel_options, channel_target, service_config
from agentd.client._resume import EventLog
from agentd.server import Script, call, calls, say
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2, run_event_pb2, session_service_pb2, stats_service_pb2, trace_service_pb2
from tests.apps import tool_log
from tests.backends_redis import delete_prefix, new_prefix
from tests.conftest import Harness, start_harness
from tests.fault_proxy import FaultProxy
from tests.runs_util import assert_well_formed, kinds

T = TypeVar("T")


@asynccontextmanager
async def replicas(
    model_server: ScriptedOpenAIServer, tmp_path: Path, count: int = 2, *, shared: bool, **settings: object
) -> AsyncIterator[list[Harness]]:
    """``count`` servers; ``shared``: one Redis store (sessions and runs) for all, else one memory store each."""
    tool_log.clear()
    prefix = new_prefix()
    store: dict[str, object] = dict(store="redis", redis_prefix=prefix) if shared else dict(store="memory")
    started: list[Harness] = []
    try:
        for index in range(count):
            directory = tmp_path / f"replica-{index}"
            directory.mkdir()
            started.append(await start_harness(
                model_server, directory, sqlite_path=directory / "agentd.db", replica_id=f"replica-{index}",
                **{**store, **settings},
            ))
        yield started
    finally:
        for harness in started:
            await harness.client.close()
            await harness.server.stop(grace_s=0)
        if shared:
            await delete_prefix(prefix)


async def proxies(stack: AsyncExitStack, servers: list[Harness]) -> list[FaultProxy]:
    return [await stack.enter_async_context(FaultProxy("127.0.0.1", h.server.port)) for h in servers]


def targets(proxies_: list[FaultProxy]) -> list[str]:
    return [f"127.0.0.1:{p.port}" for p in proxies_]


GUARD_S = 60.0  # how long a test waits before it calls a wait a hang: a bound on a failure, never a latency


async def guarded(awaitable: Awaitable[T], what: str, guard_s: float = GUARD_S) -> T:
    """``awaitable``'s result; fails the test, naming ``what``, if it has not come within ``guard_s``."""
    try:
        async with asyncio.timeout(guard_s) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            pytest.fail(f"{what}: still waiting after {guard_s:g}s (a hang)", pytrace=False)
        raise


async def heal_after(delay_s: float, proxy: FaultProxy) -> None:
    await asyncio.sleep(delay_s)
    proxy.restore()


def sequences(events: list[run_event_pb2.RunEvent]) -> list[int]:
    return [e.sequence for e in events]


async def wait_for_status(client: AgentdClient, run_id: str, status: int, within_s: float = 3.0) -> agent_service_pb2.RunInfo:
    deadline = time.monotonic() + within_s
    while True:
        run = await client.get_run(run_id)
        if run.status == status or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.05)


# The service config and targets


def test_service_config_retries_only_idempotent_methods_that_exist():
    config = service_config()
    # The file shipped for other languages is exactly what the Python client uses.
    shipped = Path(agentd.client.__file__).with_name("service_config.json")
    assert json.loads(shipped.read_text()) == config
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    retrying, writes = config["methodConfig"]
    policy = retrying["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 4 <= policy["maxAttempts"] <= 5
    assert policy["initialBackoff"] == "0.05s" and policy["maxBackoff"] == "1s"
    named = {(n["service"], n["method"]) for n in retrying["name"]}
    # Every name is a real method of the contract (a typo would silently disable its retries).
    files = (agent_service_pb2, session_service_pb2, trace_service_pb2, stats_service_pb2)
    methods = {
        (service.full_name, method.name): method
        for module in files for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods
    }
    assert named <= set(methods)
    assert {m for _, m in named} == {
        "ListAgents", "GetAgent", "ListAgentVersions", "ListAgentAliases", "SetAgentAlias", "CreateRun", "GetRun", "ListRuns", "CancelRun", "SubmitToolOutputs",
        "ApproveToolCall", "GetSession", "ListSessions", "ListSessionItems", "ListTraces", "GetTrace", "GetStats",
        "GetLiveStats",
    }
    assert named == {(s, m) for s, ms in RETRYABLE_METHODS.items() for m in ms}
    # Every unary method has a deadline; streams have none; writes are never retried by gRPC.
    unretried = {(n["service"], n["method"]) for n in writes["name"]}
    assert "retryPolicy" not in writes and retrying["timeout"] == writes["timeout"] == "30s"
    unary = {key for key, m in methods.items() if not m.client_streaming and not m.server_streaming}
    assert named | unretried == unary and not named & unretried
    assert "methodConfig" in service_config(retry=False)
    assert not any("retryPolicy" in c for c in service_config(retry=False)["methodConfig"])
    json.dumps(config)


def test_targets_become_one_grpc_target():
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("dns:///agentd.internal:50051") == "dns:///agentd.internal:50051"
    assert channel_target(["10.0.0.1:1", "10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target("10.0.0.1:1, 10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(["[::1]:1", "[fe80::2]:2"]) == "ipv6:[::1]:1,[fe80::2]:2"
    assert channel_target(["localhost:1"]) == "localhost:1"
    with pytest.raises(ValueError, match="dns:///"):
        channel_target(["agentd-a:1", "agentd-b:1"])
    with pytest.raises(ValueError, match="IPv4 and IPv6"):
        channel_target(["10.0.0.1:1", "[::1]:1"])
    with pytest.raises(ValueError, match="host:port"):
        channel_target(["10.0.0.1", "10.0.0.2:1"])


def test_event_log_drops_duplicates_and_refuses_gaps():
    def event(sequence: int, kind: str = "text_delta") -> run_event_pb2.RunEvent:
        message = run_event_pb2.RunEvent(run_id="run_x", sequence=sequence)
        getattr(message, kind).SetInParent()
        return message

    log = EventLog()
    assert [log.admit(event(s)) for s in (1, 2, 1, 2, 3)] == [True, True, False, False, True]
    assert log.last_sequence == 3 and log.run_id == "run_x" and not log.terminal
    with pytest.raises(RunStreamGapError) as gap:
        log.admit(event(5))
    assert (gap.value.last_sequence, gap.value.got) == (3, 5)
    assert log.admit(event(4, "run_completed")) and log.terminal


# Balancing and unary retries


async def test_unary_calls_are_spread_over_the_replicas(model_server, tmp_path):
    async with replicas(model_server, tmp_path, shared=False) as (a, b):
        # Only replica a has this session: which replica answered shows in the reply.
        await a.client.create_session("where")
        async with AgentdClient([a.target, b.target]) as client:
            answers: list[str] = []
            for _ in range(40):
                try:
                    await client.get_session("where")
                    answers.append("a")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND
                    answers.append("b")
            # round_robin alternates once both connections are up (the first calls may all go to one).
            last = answers[-20:]
            assert last.count("a") >= 8 and last.count("b") >= 8, answers
            assert await client.list_agents() == await a.client.list_agents()


async def test_unary_calls_are_retried_on_another_replica_when_one_goes_away(model_server, tmp_path):
    async with replicas(model_server, tmp_path, shared=False) as (a, b), AsyncExitStack() as stack:
        (proxy,) = await proxies(stack, [b])
        balanced = [a.target, f"127.0.0.1:{proxy.port}"]
        agents = len(await a.client.list_agents())
        async with AgentdClient(balanced) as retrying, AgentdClient(balanced, retry=False) as plain:
            for client in (retrying, plain):
                for _ in range(4):
                    await client.list_agents()
            assert proxy.connections_made == 2  # both clients hold a connection to each replica

            # Calls that reached replica b and then lose it: with retries they are answered by a.
            proxy.stall()
            pending = [asyncio.ensure_future(c.list_agents()) for c in (retrying, plain) for _ in range(8)]
            await asyncio.sleep(0.3)
            proxy.cut()
            results = await asyncio.gather(*pending, return_exceptions=True)
            retried, not_retried = results[:8], results[8:]
            assert all(isinstance(r, list) and len(r) == agents for r in retried), retried
            failures = [r for r in not_retried if isinstance(r, grpc.aio.AioRpcError)]
            assert failures and all(f.code() == grpc.StatusCode.UNAVAILABLE for f in failures), not_retried

            # A replica that is stopped drops out; the client keeps working on the other one.
            proxy.restore()
            await b.server.stop(grace_s=0)
            for _ in range(10):
                assert len(await retrying.list_agents()) == agents


class _LogUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, methods: list[str]) -> None:
        self.methods = methods

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        self.methods.append(_method_name(client_call_details))
        return await continuation(client_call_details, request)


class _LogStreams(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, methods: list[str]) -> None:
        self.methods = methods

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        self.methods.append(_method_name(client_call_details))
        return await continuation(client_call_details, request)


class _LogBidi(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, methods: list[str]) -> None:
        self.methods = methods

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        self.methods.append(_method_name(client_call_details))
        return await continuation(client_call_details, request_iterator)


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    return method.rsplit("/", 1)[-1]


async def test_answers_are_raised_at_once_not_retried(model_server, tmp_path, caplog):
    """An answer (NOT_FOUND, INVALID_ARGUMENT) is raised as it came, from the one call that got it:
    the client neither repeats the call nor re-attaches a stream (counted under the client's own
    retry and resume logic; the channel's retry policy is UNAVAILABLE only, see
    test_service_config_retries_only_idempotent_methods_that_exist)."""
    caplog.set_level("INFO", logger="agentd.client")
    async with replicas(model_server, tmp_path, shared=False) as (a, b):
        sent: list[str] = []  # every call the client makes (its own retries and re-attaches included)
        channel = grpc.aio.insecure_channel(channel_target([a.target, b.target]), options=channel_options(retry=True),
                                            interceptors=[_LogUnary(sent), _LogStreams(sent), _LogBidi(sent)])
        async with AgentdClient([a.target, b.target], channel=channel) as client:
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await guarded(client.run_final_output("ghost", "hi"), "a run of an unknown agent")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as empty:
                await guarded(client.create_run("assistant", "   "), "a run with no input")
            assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await guarded(_drain(client.watch_run("run_doesnotexist")), "watching an unknown run")
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert sent == ["Run", "CreateRun", "WatchRun"]
        assert [r.getMessage() for r in caplog.records if r.name == "agentd.client"] == []  # nothing resumed


async def _drain(stream) -> list:
    return [e async for e in stream]


# Run streams that survive breaks


async def test_a_run_stream_that_breaks_mid_run_continues_on_another_replica(model_server, tmp_path, caplog):
    caplog.set_level("INFO", logger="agentd.client")
    model_server.set_script("assistant", Script.of(
        calls(call("wait", seconds=0.8, label="across-the-break")),
        say("Finished despite the broken connection."),
    ))
    async with replicas(model_server, tmp_path, shared=True) as servers, AsyncExitStack() as stack:
        pa, pb = await proxies(stack, servers)
        async with AgentdClient(targets([pa, pb])) as client:
            stream = client.run("assistant", "keep going")
            events: list[run_event_pb2.RunEvent] = []
            async for event in stream:
                events.append(event)
                if event.WhichOneof("payload") == "tool_called":
                    # Both paths go down (whichever replica carried the stream), then b comes back.
                    pa.cut()
                    pb.cut()
                    connections_before = pb.connections_made
                    heal = asyncio.create_task(heal_after(0.3, pb))
            await heal
        assert_well_formed(events)  # 1..N exactly once, in order, one terminal event, last
        assert events[-1].run_completed.final_output.string_value == "Finished despite the broken connection."
        assert kinds(events).index("tool_called") < kinds(events).index("tool_output")
        assert tool_log.finished == ["across-the-break"]  # the run was never restarted
        assert pb.connections_made > connections_before  # the rest came over a new connection to b
        assert [r.getMessage() for r in caplog.records if r.name == "agentd.client"][0].startswith(
            f"run {events[0].run_id}: stream broke after event {sequences(events)[kinds(events).index('tool_called')]}"
        )
        run = await servers[0].client.get_run(events[0].run_id)
        assert run.status == agent_service_pb2.RUN_STATUS_COMPLETED and run.last_sequence == len(events)


async def test_a_stream_that_breaks_before_its_first_event_finds_its_run_by_request_id(model_server, tmp_path, caplog):
    caplog.set_level("INFO", logger="agentd.client")
    model_server.set_script("assistant", Script.of(calls(call("wait", seconds=0.6, label="first")), say("one")))
    async with replicas(model_server, tmp_path, shared=True) as servers, AsyncExitStack() as stack:
        pa, pb = await proxies(stack, servers)
        # A run holds the session; ours queues behind it and has no event yet when the paths go down.
        first = await servers[0].client.create_run("assistant", "hold", session_id="queue-1")
        async with AgentdClient(targets([pa, pb])) as client:
            await client.list_agents()
            stream = client.run("assistant", "after you", session_id="queue-1", session_policy="enqueue")
            iterator = stream.__aiter__()
            next_event = asyncio.ensure_future(anext(iterator))
            for _ in range(100):
                runs = (await servers[0].client.list_runs("queue-1")).runs
                if len(runs) == 2:
                    break
                await asyncio.sleep(0.02)
            assert [r.status for r in runs] == [agent_service_pb2.RUN_STATUS_QUEUED, agent_service_pb2.RUN_STATUS_RUNNING]
            assert not next_event.done() and stream.run_id == ""
            pa.cut()
            pb.cut()
            heal = asyncio.create_task(heal_after(0.2, pb))
            model_server.set_script("assistant", Script.of(say("Second, as queued.")))
            events = [await next_event] + [e async for e in iterator]
            await heal
        assert_well_formed(events)
        assert events[-1].run_completed.final_output.string_value == "Second, as queued."
        # CreateRun with the stream's request_id returned the queued run: no second copy was made.
        runs = (await servers[0].client.list_runs("queue-1")).runs
        assert len(runs) == 2 and runs[0].name == f"runs/{events[0].run_id}" != first.name
        assert runs[0].request_id == stream.request_id != ""
        messages = [r.getMessage() for r in caplog.records if r.name == "agentd.client"]
        assert messages[0].startswith(f"run {stream.request_id}: stream broke after event 0")


async def test_leaving_a_resumed_stream_early_cancels_the_detached_run(model_server, tmp_path):
    model_server.set_script("assistant", Script.of(
        calls(call("wait", seconds=0.3, label="short")),
        calls(call("wait", seconds=30, label="long")),
        say("never"),
    ))
    async with replicas(model_server, tmp_path, shared=True) as servers, AsyncExitStack() as stack:
        pa, pb = await proxies(stack, servers)
        async with AgentdClient(targets([pa, pb])) as client:
            stream = client.run("assistant", "go")
            seen: list[run_event_pb2.RunEvent] = []
            async for event in stream:
                seen.append(event)
                if event.WhichOneof("payload") == "tool_called":
                    if kinds(seen).count("tool_called") == 1:  # the short wait: break the stream
                        pa.cut()
                        pb.cut()
                        heal = asyncio.create_task(heal_after(0.2, pb))
                    else:
                        break  # now on WatchRun: only CancelRun can stop the run
            await heal
            await stream._ended.wait()  # the walk-away clean-up runs when the iterator is finalized
            run = await wait_for_status(client, stream.run_id, agent_service_pb2.RUN_STATUS_CANCELLED)
        assert run.status == agent_service_pb2.RUN_STATUS_CANCELLED
        assert sequences(seen) == list(range(1, len(seen) + 1))
        for _ in range(50):
            if tool_log.cancelled:
                break
            await asyncio.sleep(0.02)
        assert tool_log.cancelled == ["long"]


async def test_cancel_after_a_resume_stops_the_run_and_the_stream_ends_with_it(model_server, tmp_path):
    model_server.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="stuck")), say("never")))
    async with replicas(model_server, tmp_path, shared=True) as servers, AsyncExitStack() as stack:
        pa, pb = await proxies(stack, servers)
        async with AgentdClient(targets([pa, pb])) as client:
            stream = client.run("assistant", "go")
            events: list[run_event_pb2.RunEvent] = []
            async for event in stream:
                events.append(event)
                if event.WhichOneof("payload") == "tool_called":
                    pa.cut()
                    pb.cut()
                    await heal_after(0.2, pb)
                    await stream.cancel("changed my mind")
        assert_well_formed(events)
        assert events[-1].run_cancelled.reason == "changed my mind"
        assert tool_log.cancelled == ["stuck"]


async def test_the_sync_client_resumes_too(model_server, tmp_path):
    model_server.set_script("assistant", Script.of(
        calls(call("wait", seconds=0.6, label="sync-break")), say("Sync client made it."),
    ))
    async with replicas(model_server, tmp_path, shared=True) as servers, AsyncExitStack() as stack:
        pa, pb = await proxies(stack, servers)
        loop = asyncio.get_running_loop()
        broken = asyncio.Event()

        def consume() -> list[run_event_pb2.RunEvent]:
            events = []
            with SyncAgentdClient(targets([pa, pb])) as client:
                for event in client.run("assistant", "sync"):
                    events.append(event)
                    if event.WhichOneof("payload") == "tool_called":
                        loop.call_soon_threadsafe(broken.set)
                        time.sleep(0.1)
            return events

        consumer = asyncio.ensure_future(asyncio.to_thread(consume))
        await asyncio.wait_for(broken.wait(), 5)
        pa.cut()
        pb.cut()
        await heal_after(0.2, pb)
        events = await asyncio.wait_for(consumer, 10)
        assert_well_formed(events)
        assert events[-1].run_completed.final_output.string_value == "Sync client made it."
        assert tool_log.finished == ["sync-break"]


async def test_the_stream_goes_on_when_the_replica_running_it_stops(model_server, tmp_path, caplog):
    """A replica crash as the client sees it: its connections drop and its run moves to the survivor."""
    model_server.set_script("assistant", Script.of(
        calls(call("wait", seconds=0.5, label="interrupted")), say("Done on the other replica."),
    ))
    caplog.set_level("INFO", logger="agentd.client")
    async with replicas(model_server, tmp_path, shared=True, run_lease_s=1.0) as servers, AsyncExitStack() as stack:
        paths = dict(zip((h.server.runs.replica_id for h in servers), await proxies(stack, servers)))
        by_replica = {h.server.runs.replica_id: h for h in servers}
        async with AgentdClient(targets(list(paths.values()))) as client:
            events: list[run_event_pb2.RunEvent] = []
            stopping: asyncio.Task[None] | None = None
            async for event in client.run("assistant", "survive a replica"):
                events.append(event)
                if event.WhichOneof("payload") == "tool_called" and stopping is None:
                    executing = (await by_replica["replica-0"].client.get_run(event.run_id)).replica
                    (survivor,) = set(paths) - {executing}
                    for proxy in paths.values():
                        proxy.cut()
                    stopping = asyncio.create_task(by_replica[executing].server.stop(grace_s=0))
                    heal = asyncio.create_task(heal_after(0.2, paths[survivor]))
            assert stopping is not None
            await stopping
            await heal
        # One unbroken sequence: the takeover's run_resumed event, the interrupted step finished, the end.
        assert sequences(events) == list(range(1, len(events) + 1))
        assert len({e.run_id for e in events}) == 1
        names = kinds(events)
        assert names[0] == "run_started" and names[-1] == "run_completed" and names.count("run_completed") == 1
        resumed = [e.run_resumed for e in events if e.WhichOneof("payload") == "run_resumed"]
        assert len(resumed) == 1 and resumed[0].attempt == 2
        assert names.index("tool_called") < names.index("run_resumed") < names.index("tool_output")
        assert events[-1].run_completed.final_output.string_value == "Done on the other replica."
        assert any("resuming" in r.getMessage() for r in caplog.records if r.name == "agentd.client")
        run = await by_replica[survivor].client.get_run(events[0].run_id)
        assert run.attempt == 2 and run.last_sequence == len(events)


async def test_closing_the_client_right_after_leaving_a_stream_still_cancels_the_run(model_server, tmp_path):
    model_server.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="orphan?")), say("never")))
    async with replicas(model_server, tmp_path, count=1, shared=False) as (server,):
        async with AgentdClient(server.target) as client:
            async for event in client.run("assistant", "go"):
                if event.WhichOneof("payload") == "tool_called":
                    run_id = event.run_id
                    break
        # The block closed the client at once: the detached run must not outlive it.
        run = await wait_for_status(server.client, run_id, agent_service_pb2.RUN_STATUS_CANCELLED)
        assert run.status == agent_service_pb2.RUN_STATUS_CANCELLED
        assert tool_log.cancelled == ["orphan?"]


async def test_a_stream_gives_up_after_its_resume_budget_when_no_replica_answers(model_server, tmp_path):
    model_server.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="unreachable")), say("never")))
    async with replicas(model_server, tmp_path, count=1, shared=False) as (server,), FaultProxy(
        "127.0.0.1", server.server.port
    ) as proxy:
        async with AgentdClient(f"127.0.0.1:{proxy.port}", resume_timeout_s=0.6) as client:
            stream = client.run("assistant", "go")

            async def follow() -> None:
                async for event in stream:
                    if event.WhichOneof("payload") == "tool_called":
                        proxy.cut()

            # It gives up (rather than retrying for ever); when, to the budget, is Reconnects'
            # (test_reconnects_spend_the_budget_of_an_outage_and_no_more, on a clock of its own).
            with pytest.raises(RunStreamError) as lost:
                await guarded(follow(), "a stream with no replica to re-attach to")
            # The documented error, naming where the caller was; the last transport error is its cause.
            assert not isinstance(lost.value, grpc.RpcError)
            assert lost.value.run_id == stream.run_id and lost.value.last_sequence == stream.last_sequence
            assert "within 0.6s (resume_timeout_s)" in str(lost.value)
            assert isinstance(lost.value.__cause__, grpc.aio.AioRpcError)
            assert lost.value.__cause__.code() == grpc.StatusCode.UNAVAILABLE
        # The detached run goes on where nobody could reach it; the operator can still stop it.
        assert (await server.client.get_run(stream.run_id)).status == agent_service_pb2.RUN_STATUS_RUNNING
        assert (await server.client.cancel_run(stream.run_id)).name == f"runs/{stream.run_id}"


def test_reconnects_spend_the_budget_of_an_outage_and_no_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume budget, on a clock the test moves (times in binary fractions, so exact): the
    first retry after a break is immediate, later ones back off (0.05 s doubling, ±25 %) but never
    past the budget's end; the stream gives up once an outage has lasted the budget, not before;
    an event ends the outage, and the next break has the whole budget again."""
    clock = [1024.0]
    monkeypatch.setattr(_resume, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    reconnects = _resume.Reconnects(0.5)

    reconnects.attempt()
    assert reconnects.delay_after() == 0.0  # the outage begins at 1024: retry at once
    reconnects.attempt()
    assert 0.05 * 0.75 <= reconnects.delay_after() <= 0.05 * 1.25
    clock[0] = 1024.125
    reconnects.attempt()
    assert 0.1 * 0.75 <= reconnects.delay_after() <= 0.1 * 1.25
    clock[0] = 1024.375
    reconnects.attempt()
    assert reconnects.delay_after() == 0.125  # the backoff (0.2 s or so) cut to what is left of the budget
    clock[0] = 1024.5
    assert reconnects.delay_after() is None  # the budget is spent: give up
    assert reconnects.delay_after() is None

    fresh = _resume.Reconnects(0.5)
    fresh.attempt()
    assert fresh.delay_after() == 0.0  # an outage begins at 1024.5
    clock[0] = 1024.875
    fresh.progressed()  # an event: that outage is over
    fresh.attempt()
    assert fresh.delay_after() == 0.0  # a new one begins at 1024.875
    clock[0] = 1025.25
    fresh.attempt()
    assert fresh.delay_after() is not None  # 0.375 s into it
    clock[0] = 1025.375
    assert fresh.delay_after() is None
