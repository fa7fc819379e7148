"""Helpers for reading run event streams in tests."""

from __future__ import annotations

from typing import Any, Awaitable

import grpc

from agentd.client import AgentdClient, RunStream
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import run_event_pb2

TERMINAL = {"run_completed", "run_failed", "run_cancelled"}


async def collect(stream: RunStream) -> list[run_event_pb2.RunEvent]:
    events = [event async for event in stream]
    assert_well_formed(events)
    return events


def kinds(events: list[run_event_pb2.RunEvent]) -> list[str]:
    return [e.WhichOneof("payload") for e in events]


def of_kind(events: list[run_event_pb2.RunEvent], kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("payload") == kind]


def assert_well_formed(events: list[run_event_pb2.RunEvent]) -> None:
    """One run, sequence 1..N with no gaps, a trace id on every event, exactly one terminal event, last."""
    assert events, "no events"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len({e.run_id for e in events}) == 1 and events[0].run_id.startswith("run_")
    assert all(e.trace_id == events[0].trace_id and len(e.trace_id) == 32 for e in events)
    assert all(e.HasField("create_time") for e in events)
    names = kinds(events)
    assert names[0] == "run_started"
    assert names[-1] in TERMINAL and sum(n in TERMINAL for n in names) == 1


async def outcome(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status code and details a unary call ends with."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def stream_outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details a server stream ends with (its messages read and dropped)."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def wait_for_action(client: AgentdClient, run_id: str) -> str:
    """The call id the run waits on, from its event stream (no polling)."""
    watch = client.agents.WatchRun(apb.WatchRunRequest(name=f"runs/{run_id}"))
    try:
        async for response in watch:
            if response.event.WhichOneof("payload") == "action_required":
                return response.event.action_required.item.tool_call.call_id
    finally:
        watch.cancel()
    raise AssertionError(f"run {run_id} ended without asking for approval")


async def wait_for_actions(client: AgentdClient, run_id: str, count: int) -> list[tuple[str, str]]:
    """The first ``count`` answers the run asked for, as (tool name, call id), in order, from its
    event stream (no polling): returns once the ``count``-th ``action_required`` event is durable."""
    watch = client.agents.WatchRun(apb.WatchRunRequest(name=f"runs/{run_id}"))
    asked: list[tuple[str, str]] = []
    try:
        async for response in watch:
            if response.event.WhichOneof("payload") == "action_required":
                call = response.event.action_required.item.tool_call
                asked.append((call.tool_name, call.call_id))
                if len(asked) == count:
                    return asked
    finally:
        watch.cancel()
    raise AssertionError(f"run {run_id} ended after asking for {len(asked)} of {count} answers: {asked}")
