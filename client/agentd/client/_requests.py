"""Request building shared by the async and sync clients."""

from __future__ import annotations

from typing import Any, Mapping

from google.protobuf import json_format, struct_pb2

from agentd.client.errors import RunCancelledError, RunFailedError
from agentd.v1 import agent_service_pb2, run_event_pb2


def start_run(
    agent: str,
    input: str,
    *,
    session_id: str | None = None,
    context: Mapping[str, Any] | None = None,
    max_turns: int = 0,
    request_id: str = "",
    workflow_name: str = "",
    group_id: str = "",
    trace_metadata: Mapping[str, str] | None = None,
) -> agent_service_pb2.StartRun:
    start = agent_service_pb2.StartRun(
        agent=agent if agent.startswith("agents/") else f"agents/{agent}",
        input=input,
        session=f"sessions/{session_id}" if session_id else "",
        max_turns=max_turns,
        request_id=request_id,
        trace=agent_service_pb2.TraceOptions(
            workflow_name=workflow_name, group_id=group_id, metadata=dict(trace_metadata or {})
        ),
    )
    if context:
        start.context.update(dict(context))
    return start


def python_value(value: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as a plain Python value (str, dict, list, float, bool, None)."""
    return json_format.MessageToDict(value)


def final_output_of(event: run_event_pb2.RunEvent) -> tuple[bool, Any]:
    """(True, output) for a completed run; raises for a failed or cancelled one; (False, None) otherwise."""
    kind = event.WhichOneof("payload")
    if kind == "run_completed":
        return True, python_value(event.run_completed.final_output)
    if kind == "run_failed":
        raise RunFailedError(event.run_id, event.run_failed)
    if kind == "run_cancelled":
        raise RunCancelledError(event.run_id, event.run_cancelled)
    return False, None


def session_name(session_id: str) -> str:
    return session_id if session_id.startswith("sessions/") else f"sessions/{session_id}"
