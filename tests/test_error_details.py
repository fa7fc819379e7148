"""Structured errors: every error status carries google.rpc.Status details (ErrorInfo with a
reason from the agentd.v1.ErrorReason catalogue, BadRequest, ResourceInfo, RetryInfo), and the
Python clients expose them as typed attributes of their exceptions."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentd.client import AgentdRpcError, FieldViolation, SyncAgentdClient, SyncAgentdRpcError, error_reason
from agentd.client._resume import is_stream_break
from agentd.server import Script, call, calls, say
from agentd.server.services.status import REASONS, Problem, grpc_status
from agentd.v1 import agent_service_pb2, errors_pb2, session_service_pb2
from tests.conftest import Harness
from tests.runs_util import wait_for_action

SERVER = Path(__file__).resolve().parents[1] / "server" / "agentd" / "server"


def details_of(error: grpc.aio.AioRpcError) -> dict[str, object]:
    """The error's details, decoded by hand from the trailer (what any language does)."""
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0] and status.message == error.details()
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                     error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


async def test_an_unknown_agent_names_the_reason_the_agent_and_the_resource(harness: Harness) -> None:
    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.get_agent("nobody")
    error = caught.value
    assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.NOT_FOUND
    assert "does not exist; this server hosts" in error.details()
    assert (error.reason, error.domain, error.reason_metadata) == ("AGENT_NOT_FOUND", "agentd.dev", {"agent": "nobody"})
    assert (error.resource_type, error.resource_name) == ("agentd.dev/Agent", "agents/nobody")
    assert error.retry_after is None and error.field_violations == ()
    info = details_of(error)["ErrorInfo"]
    assert info.reason == "AGENT_NOT_FOUND"  # type: ignore[attr-defined]


async def test_a_busy_session_names_the_active_run(harness: Harness) -> None:
    harness.model.set_script("operator", Script.of(calls(call("lookup_customer", customer_id="c1")), say("done")))
    first = await harness.client.create_run("operator", "look c1 up", session_id="busy")
    await wait_for_action(harness.client, first.name.removeprefix("runs/"))  # the run now owns the session
    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.create_run("operator", "again", session_id="busy")
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "SESSION_BUSY"
    assert error.reason_metadata == {"session": "sessions/busy", "active_run": first.name}
    # Writing the session's items while the run owns them: the same reason and metadata.
    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.clear_items("busy")
    assert caught.value.reason == "SESSION_BUSY" and caught.value.reason_metadata["active_run"] == first.name
    await harness.client.cancel_run(first.name)


async def test_invalid_arguments_list_each_field_in_bad_request(harness: Harness) -> None:
    # A raw stub call (what other languages make) carries the same details; the client reads them.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.client.sessions.UpdateSession(session_service_pb2.UpdateSessionRequest(
            session=session_service_pb2.Session(name="sessions/s1"), update_mask={"paths": ["item_count"]},
        ))
    assert details_of(caught.value)["BadRequest"].field_violations[0].field == "update_mask.paths[0]"  # type: ignore[attr-defined]
    error = AgentdRpcError.of(caught.value)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_ARGUMENT"
    (violation,) = error.field_violations
    assert isinstance(violation, FieldViolation) and violation.field == "update_mask.paths[0]"
    assert error.reason_metadata == {"field": "update_mask.paths[0]"}
    assert error.details().startswith("update_mask.paths[0]: ")


async def test_missing_and_taken_resources_carry_resource_info(harness: Harness) -> None:
    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.get_session("ghost")
    assert (caught.value.reason, caught.value.resource_name) == ("SESSION_NOT_FOUND", "sessions/ghost")
    assert caught.value.resource_type == "agentd.dev/Session"

    await harness.client.create_session("taken")
    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.create_session("taken")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (caught.value.reason, caught.value.resource_name) == ("SESSION_EXISTS", "sessions/taken")

    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.get_run("run_nope")
    assert (caught.value.reason, caught.value.resource_name) == ("RUN_NOT_FOUND", "runs/run_nope")

    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.get_trace("0" * 32)
    assert (caught.value.reason, caught.value.resource_type) == ("TRACE_NOT_FOUND", "agentd.dev/Trace")


async def test_an_answer_for_a_call_the_run_does_not_wait_for_names_what_it_waits_for(harness: Harness) -> None:
    harness.model.set_script("operator", Script.of(calls(call("lookup_customer", customer_id="c1")), say("done")))
    run = await harness.client.create_run("operator", "look c1 up")
    run_id = run.name.removeprefix("runs/")
    call_id = await wait_for_action(harness.client, run_id)
    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.submit_tool_output(run_id, "not-a-call", "x")
    assert caught.value.reason == "RUN_NOT_WAITING"
    assert caught.value.reason_metadata == {"run": run.name, "call_id": "not-a-call", "waiting_for": call_id}
    await harness.client.submit_tool_output(run_id, call_id, "Ada")
    with pytest.raises(AgentdRpcError) as caught:
        await harness.client.submit_tool_output(run_id, call_id, "Grace")
    assert caught.value.reason == "ANSWER_CONFLICT" and caught.value.reason_metadata["call_id"] == call_id


async def test_a_start_stream_error_carries_details_too(harness: Harness) -> None:
    stream = harness.client.agents.StreamRun(agent_service_pb2.StreamRunRequest(
        start=agent_service_pb2.StartRun(agent="nobody", input="hi")
    ))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    assert error_reason(caught.value) == "AGENT_NOT_FOUND"
    assert details_of(caught.value)["ResourceInfo"].resource_name == "agents/nobody"  # type: ignore[attr-defined]


async def test_the_sync_client_raises_its_errors_with_details(harness: Harness) -> None:
    import asyncio

    def probe() -> SyncAgentdRpcError:
        with SyncAgentdClient(harness.target) as client:
            try:
                client.get_session("nowhere")
            except SyncAgentdRpcError as exc:
                return exc
        raise AssertionError("no error")

    error = await asyncio.to_thread(probe)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.NOT_FOUND
    assert (error.reason, error.resource_name) == ("SESSION_NOT_FOUND", "sessions/nowhere")


def test_retry_info_and_a_lagging_stream_are_read_by_the_client() -> None:
    lagged = grpc_status(Problem(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "STREAM_LAGGED", "fell behind", {"run": "runs/r", "last_sequence": "7"},
        retry_after_s=0.25,
    ))
    error = AgentdRpcError(lagged.code, (), lagged.trailing_metadata, lagged.details)
    assert error.retry_after == 0.25 and error.reason_metadata["last_sequence"] == "7"
    # A stream the server ended for lagging is re-attached after its last event; other
    # RESOURCE_EXHAUSTED answers (a full queue) are answers, not breaks.
    assert is_stream_break(error)
    full = grpc_status(Problem(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", "full", {"limit": "1"}))
    assert not is_stream_break(AgentdRpcError(full.code, (), full.trailing_metadata, full.details))
    # grpcio-status reads what agentd writes.
    assert rpc_status.to_status(Problem(grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", "x").to_status()).code == (
        grpc.StatusCode.NOT_FOUND
    )


def test_a_reason_outside_the_catalogue_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="catalogue"):
        Problem(grpc.StatusCode.NOT_FOUND, "NO_SUCH_REASON", "x")


def test_every_reason_in_the_catalogue_is_raised_somewhere_in_the_server() -> None:
    # The catalogue is a promise to callers: no reason a caller must handle that never comes.
    source = "\n".join(p.read_text() for p in SERVER.rglob("*.py"))
    raised = set(re.findall(r'"([A-Z][A-Z_]+)"', source)) | {
        name for name in REASONS if f"{name} = " in source  # constants such as RUN_NOT_WAITING = "RUN_NOT_WAITING"
    }
    assert REASONS == {n.removeprefix("ERROR_REASON_") for n in errors_pb2.ErrorReason.keys()} - {"UNSPECIFIED"}
    assert REASONS <= raised, REASONS - raised
