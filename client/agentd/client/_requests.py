"""Request building shared by the async and sync clients."""

from __future__ import annotations

import uuid
from typing import Any, Mapping, Sequence

from google.protobuf import json_format, struct_pb2

from agentd.client.errors import RunCancelledError, RunFailedError
from agentd.v1 import agent_service_pb2, item_pb2, run_event_pb2


SessionPolicyLike = str | int | None
"""``"reject"``, ``"enqueue"``, a ``agent_service_pb2.SESSION_POLICY_*`` value, or None (server default: reject)."""


def session_policy_value(policy: SessionPolicyLike) -> int:
    """The ``SessionPolicy`` enum value for ``"reject"``/``"enqueue"`` (any case), an enum value or None."""
    if policy is None:
        return agent_service_pb2.SESSION_POLICY_UNSPECIFIED
    if isinstance(policy, str):
        name = policy.strip().upper()
        if not name.startswith("SESSION_POLICY_"):
            name = f"SESSION_POLICY_{name}"
        try:
            return agent_service_pb2.SessionPolicy.Value(name)
        except ValueError:
            raise ValueError(f"session_policy: expected 'reject' or 'enqueue', got {policy!r}") from None
    agent_service_pb2.SessionPolicy.Name(policy)  # raises ValueError for an unknown number
    return int(policy)


def new_request_id() -> str:
    """A fresh idempotency key (uuid4): what makes retrying a run's creation safe."""
    return str(uuid.uuid4())


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
    session_policy: SessionPolicyLike = None,
    detached: bool = False,
    input_items: Sequence[item_pb2.Item] = (),
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
        session_policy=session_policy_value(session_policy),
        detached=detached,
        input_items=list(input_items),
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


def run_name(run_id: str) -> str:
    """``runs/{run}`` for a bare run id (as events carry it) or a resource name."""
    return run_id if run_id.startswith("runs/") else f"runs/{run_id}"


def run_id_of(name: str) -> str:
    """The bare run id (``run_…``, as in ``RunEvent.run_id``) of ``runs/{run}``."""
    return name.removeprefix("runs/")


def session_name(session_id: str) -> str:
    return session_id if session_id.startswith("sessions/") else f"sessions/{session_id}"


def tool_output_request(
    run_id: str, call_id: str, output: str, is_error: bool
) -> agent_service_pb2.SubmitToolOutputsRequest:
    return agent_service_pb2.SubmitToolOutputsRequest(
        name=run_name(run_id),
        outputs=[agent_service_pb2.ToolOutputSubmission(call_id=call_id, output=output, is_error=is_error)],
    )


def approval_request(run_id: str, call_id: str, approved: bool, reason: str) -> agent_service_pb2.ApproveToolCallRequest:
    return agent_service_pb2.ApproveToolCallRequest(
        name=run_name(run_id),
        approval=agent_service_pb2.ToolApproval(call_id=call_id, approved=approved, reason=reason),
    )
