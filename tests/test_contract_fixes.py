"""Contract fixes over the real wire: UpdateSession's update mask (AIP-134), ToolCall.arguments
of a call without arguments, and gRPC server reflection v1 next to v1alpha."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.duration_pb2 import Duration
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentd.server import Script, call, calls, say
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import session_service_pb2 as spb
from tests.runs_util import outcome

# -- UpdateSession: AIP-134 -----------------------------------------------------------------


async def _session(harness, sid: str) -> spb.Session:
    return (await harness.client.sessions.CreateSession(spb.CreateSessionRequest(session_id=sid, session=spb.Session(
        metadata={"user": "ada"}, state={"step": 1}, ttl=Duration(seconds=3600))))).session


async def _update(harness, session: spb.Session, paths: list[str] | None = None) -> spb.Session:
    request = spb.UpdateSessionRequest(session=session)
    if paths is not None:
        request.update_mask.paths.extend(paths)
    return (await harness.client.sessions.UpdateSession(request)).session


def _view(session: spb.Session) -> tuple[dict, dict, int | None]:
    """metadata, state and ttl (seconds; None when the session never expires)."""
    ttl = session.ttl.seconds if session.HasField("ttl") else None
    return dict(session.metadata), json_format.MessageToDict(session.state), ttl


async def test_update_without_a_mask_changes_only_the_fields_sent(harness):
    """Before: only ``state`` sent, no mask: metadata became {} (and state {} when only metadata was sent)."""
    await _session(harness, "u")
    name = "sessions/u"
    assert _view(await _update(harness, spb.Session(name=name, state={"step": 2}))) == (
        {"user": "ada"}, {"step": 2}, 3600)
    assert _view(await _update(harness, spb.Session(name=name, metadata={"user": "grace"}))) == (
        {"user": "grace"}, {"step": 2}, 3600)
    assert _view(await _update(harness, spb.Session(name=name, ttl=Duration(seconds=60)))) == (
        {"user": "grace"}, {"step": 2}, 60)
    # A ttl sent as zero is set: it removes the expiry; nothing else changes.
    cleared_ttl = await _update(harness, spb.Session(name=name, ttl=Duration(seconds=0)))
    assert _view(cleared_ttl) == ({"user": "grace"}, {"step": 2}, None) and not cleared_ttl.HasField("expire_time")
    # Nothing set: nothing changes.
    assert _view(await _update(harness, spb.Session(name=name))) == ({"user": "grace"}, {"step": 2}, None)
    assert _view((await harness.client.sessions.GetSession(spb.GetSessionRequest(name=name))).session) == (
        {"user": "grace"}, {"step": 2}, None)


async def test_update_with_a_mask_changes_exactly_the_masked_fields(harness):
    await _session(harness, "m")
    name = "sessions/m"
    # Only the masked field, whatever else the request sets.
    assert _view(await _update(harness, spb.Session(name=name, metadata={"user": "x"}, state={"step": 9},
                                                    ttl=Duration(seconds=5)), ["state"])) == (
        {"user": "ada"}, {"step": 9}, 3600)
    # A masked field left empty is cleared.
    assert _view(await _update(harness, spb.Session(name=name), ["metadata"])) == ({}, {"step": 9}, 3600)
    assert _view(await _update(harness, spb.Session(name=name, metadata={"a": "b"}), ["state", "metadata"])) == (
        {"a": "b"}, {}, 3600)
    assert _view(await _update(harness, spb.Session(name=name), ["ttl"])) == ({"a": "b"}, {}, None)
    # "*": every updatable field, replaced by what the request holds.
    assert _view(await _update(harness, spb.Session(name=name, state={"s": 1}, ttl=Duration(seconds=30)), ["*"])) == (
        {}, {"s": 1}, 30)


@pytest.mark.parametrize("paths,index,bad", [
    (["metadata", "item_count"], 1, "item_count"),
    (["nope"], 0, "nope"),
    (["name"], 0, "name"),
    (["state", "metadata.user"], 1, "metadata.user"),
])
async def test_an_unknown_mask_path_is_invalid_argument_naming_it(harness, paths, index, bad):
    await _session(harness, "bad")
    code, details = await outcome(harness.client.sessions.UpdateSession(spb.UpdateSessionRequest(
        session=spb.Session(name="sessions/bad", metadata={"user": "x"}), update_mask={"paths": paths})))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"update_mask.paths[{index}]: '{bad}'"), details
    # Nothing of a refused update was applied.
    got = (await harness.client.sessions.GetSession(spb.GetSessionRequest(name="sessions/bad"))).session
    assert _view(got) == ({"user": "ada"}, {"step": 1}, 3600)


# -- ToolCall.arguments of a call without arguments --------------------------------------------


def _assert_empty_arguments(tool_call) -> None:
    assert tool_call.HasField("arguments"), tool_call
    assert dict(tool_call.arguments) == {} and tool_call.raw_arguments == ""
    # As JSON (grpc-gateway, buf curl, the CLI's --json): an empty object, not absent (null).
    assert json_format.MessageToDict(tool_call)["arguments"] == {}


async def test_a_handoff_call_has_empty_arguments_not_null(harness):
    """Before: a handoff (``transfer_to_specialist`` with ``{}``) arrived with ``arguments`` unset and
    ``raw_arguments`` empty, in the run's events and in the session's items."""
    script = Script.of(calls(call("transfer_to_specialist")), say("done"))
    harness.model.set_script("assistant", script)
    harness.model.set_script("specialist", script)
    events = [r.event async for r in harness.client.agents.StreamRun(apb.StreamRunRequest(start=apb.StartRun(
        agent="agents/assistant", input="hand me over", session="sessions/handoff")))]
    assert events[-1].WhichOneof("payload") == "run_completed"
    assert [e.handoff.to_agent for e in events if e.WhichOneof("payload") == "handoff"] == ["specialist"]
    called = [e.tool_called.item.tool_call for e in events if e.WhichOneof("payload") == "tool_called"]
    assert [c.tool_name for c in called] == ["transfer_to_specialist"]
    _assert_empty_arguments(called[0])

    # The same call, replayed through WatchRun and read back from the session.
    watched = [r.event async for r in harness.client.agents.WatchRun(apb.WatchRunRequest(name=events[0].run_id))]
    _assert_empty_arguments(next(e.tool_called.item.tool_call for e in watched
                                 if e.WhichOneof("payload") == "tool_called"))
    items = (await harness.client.sessions.ListSessionItems(spb.ListSessionItemsRequest(
        parent="sessions/handoff"))).items
    stored = [i.tool_call for i in items if i.WhichOneof("content") == "tool_call"]
    assert [c.tool_name for c in stored] == ["transfer_to_specialist"]
    _assert_empty_arguments(stored[0])


async def test_a_caller_executed_call_without_arguments_has_empty_arguments(harness):
    """The same for ``ActionRequired`` and ``RunInfo.required_actions``; arguments that are not an
    object still arrive as raw_arguments, with ``arguments`` unset."""
    harness.model.set_script("operator", Script.of(
        calls(call("lookup_customer", {}), call("lookup_customer", "not json")), say("done")))
    run = (await harness.client.agents.CreateRun(apb.CreateRunRequest(start=apb.StartRun(
        agent="agents/operator", input="look")))).run
    waiting = []
    watch = harness.client.agents.WatchRun(apb.WatchRunRequest(name=run.name))
    async for response in watch:
        if response.event.WhichOneof("payload") == "action_required":
            waiting.append(response.event.action_required.item.tool_call)
            if len(waiting) == 2:
                break
    watch.cancel()
    by_raw = {c.raw_arguments: c for c in waiting}
    _assert_empty_arguments(by_raw[""])
    assert not by_raw["not json"].HasField("arguments")
    info = (await harness.client.agents.GetRun(apb.GetRunRequest(name=run.name))).run
    required = {a.item.tool_call.raw_arguments: a.item.tool_call for a in info.required_actions}
    _assert_empty_arguments(required[""])
    await harness.client.agents.CancelRun(apb.CancelRunRequest(name=run.name))


# -- server reflection v1 and v1alpha --------------------------------------------------------

SERVICES = {"agentd.v1.AgentService", "agentd.v1.SessionService", "agentd.v1.TraceService", "agentd.v1.StatsService",
            "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"}


def _buf() -> str:
    """buf from the virtualenv running the tests (the dev extra installs it there), else from PATH;
    a missing buf fails the test (it is a dev dependency), never skips it."""
    found = Path(sys.executable).parent / "buf"
    path = str(found) if found.exists() else shutil.which("buf")
    assert path is not None, "buf is not installed: `make test` installs it (buf-bin, the dev extra) into .venv/bin"
    return path


async def _buf_curl(target: str, protocol: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        _buf(), "curl", "--reflect-protocol", protocol, "--protocol", "grpc", "--http2-prior-knowledge", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, out.decode(), err.decode()


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_reflects_with_either_protocol(harness, protocol):
    """Before: ``--reflect-protocol grpc-v1`` got UNIMPLEMENTED (only v1alpha was served)."""
    url = f"http://{harness.target}"
    code, out, err = await _buf_curl(harness.target, protocol, "--list-services", url)
    assert code == 0, err
    assert set(out.split()) == SERVICES
    # A call whose schema buf reads through reflection alone.
    code, out, err = await _buf_curl(harness.target, protocol, "-d", '{"name": "assistant"}',
                                     f"{url}/agentd.v1.AgentService/GetAgent")
    assert code == 0, err
    assert json.loads(out)["agent"]["name"] == "agents/assistant"


async def _reflect(channel: grpc.aio.Channel, path: str, request: reflection_pb2.ServerReflectionRequest):
    """One reflection exchange on ``path``; v1 and v1alpha messages are the same on the wire."""
    stream = channel.stream_stream(path, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                   response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    async for response in stream(iter([request]), timeout=30):
        return response
    raise AssertionError("no reflection response")


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_describes_the_services_and_itself(harness, version):
    path = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    async with grpc.aio.insecure_channel(harness.target) as channel:
        listed = await _reflect(channel, path, reflection_pb2.ServerReflectionRequest(list_services=""))
        assert {s.name for s in listed.list_services_response.service} == SERVICES
        for symbol, file in (("agentd.v1.SessionService", "agentd/v1/session_service.proto"),
                             ("grpc.reflection.v1.ServerReflection", "grpc/reflection/v1/reflection.proto")):
            found = await _reflect(channel, path, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
            assert found.WhichOneof("message_response") == "file_descriptor_response", found
            files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                     for raw in found.file_descriptor_response.file_descriptor_proto]
            assert file in {f.name for f in files}
        v1 = next(f for f in files if f.name == "grpc/reflection/v1/reflection.proto")
        assert v1.package == "grpc.reflection.v1"
        method = v1.service[0].method[0]
        assert (method.input_type, method.output_type) == (
            ".grpc.reflection.v1.ServerReflectionRequest", ".grpc.reflection.v1.ServerReflectionResponse")
        # The generated v1alpha stub still works as before.
        if version == "v1alpha":
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [r async for r in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)]
            assert {s.name for s in replies[0].list_services_response.service} == SERVICES


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_v1_is_authenticated_as_v1alpha_is(model_server, tmp_path, version):
    from agentd.server.auth.api_keys import create_key
    from tests.conftest import start_harness

    keys = tmp_path / "keys.json"
    _, key = create_key(keys, tenant="acme", subject="ops", scopes=["traces:read"])
    path = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    for reflection, anonymous in (("authenticated", grpc.StatusCode.UNAUTHENTICATED), ("open", grpc.StatusCode.OK)):
        h = await start_harness(model_server, tmp_path, api_keys_file=keys, reflection=reflection)
        try:
            async with grpc.aio.insecure_channel(h.target) as channel:
                try:
                    await _reflect(channel, path, listing)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                assert code == anonymous, (reflection, code)
                stream = channel.stream_stream(
                    path, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                replies = [r async for r in stream(iter([listing]), metadata=[("authorization", f"Bearer {key}")],
                                                   timeout=30)]
                assert {s.name for s in replies[0].list_services_response.service} == SERVICES
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)
