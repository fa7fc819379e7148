"""What a caller (or a trace reader) sees never carries a secret, a credential, or content
the caller did not send: model endpoint credentials, an upstream error body echoing the
API key, a tool's exception message when trace content is off."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from agentd.client import AgentdClient
from agentd.server import Script, call, calls, say
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.serve import start_server
from agentd.server.settings import Settings
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import run_event_pb2, trace_service_pb2
from tests.apps import app
from tests.conftest import start_harness
from tests.otlp_receiver import OtlpReceiver
from tests.runs_util import collect, of_kind

API_KEY = "sk-proj-Zq8vT3xLm2Nw9Rk4Yp7Hs1Jd6Fb0Gc5A"
PASSWORD = "s3cret"
PERSONAL = "card 4111 1111 1111 1111 belongs to Alice"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def traces_seen_by_a_reader(client: AgentdClient, trace_id: str) -> str:
    """Everything TraceService serves about the run: its trace, every span, and its listing."""
    detail = await client.get_trace(trace_id)
    listed = await client.list_traces()
    return str(detail) + str(listed)


def agentd_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("agentd"))


# -- 1. credentials in the model endpoint's URL --------------------------------------


@pytest.mark.parametrize("configured_by", ["setting", "OPENAI_BASE_URL"])
async def test_credentials_in_the_model_endpoint_url_never_reach_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, configured_by: str
) -> None:
    caplog.set_level(logging.INFO)
    port = closed_port()
    url = f"http://user:{PASSWORD}@127.0.0.1:{port}/v1"
    if configured_by == "setting":
        provider = OpenAIProvider(api_key="k", base_url=url, max_retries=0, timeout_s=5)
    else:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        provider = OpenAIProvider(api_key="k", max_retries=0, timeout_s=5)
    server = await start_server(Settings(port=0, store="memory"), app, models=provider)
    try:
        async with AgentdClient(server.target) as client:
            events = await collect(client.run("assistant", "hello?"))
            failed = events[-1].run_failed
            run = await client.get_run(events[0].run_id)
            traces = await traces_seen_by_a_reader(client, events[0].trace_id)
    finally:
        await server.stop(grace_s=0)

    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_UNAVAILABLE
    # Still says which endpoint is unreachable, without its user info.
    assert f"http://127.0.0.1:{port}/v1" in failed.message and "unreachable" in failed.message
    for seen in (failed.message, str(run), traces, caplog.text):
        assert PASSWORD not in seen and "user:" not in seen


async def test_credentials_in_the_model_endpoint_url_stay_out_of_the_server_log(
    model_server: ScriptedOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = model_server.base_url.replace("http://", f"http://user:{PASSWORD}@")
    provider = OpenAIProvider(api_key="k", base_url=url, max_retries=0, timeout_s=5)
    server = await start_server(Settings(port=0, store="memory"), app, models=provider)
    try:
        async with AgentdClient(server.target) as client:
            model_server.set_script("assistant", Script.of(say("hello")))
            assert await client.run_final_output("assistant", "hi") == "hello"
    finally:
        await server.stop(grace_s=0)
    assert "HTTP Request" in caplog.text  # the HTTP library logs each request's URL...
    assert PASSWORD not in caplog.text  # ...without its credentials


# -- 2. an upstream 401 echoing the Authorization header ------------------------------


def echo_authorization(headers) -> str:
    return f"bad key {headers.get('Authorization', '')}"


async def test_an_upstream_error_echoing_the_api_key_is_not_forwarded(
    model_server: ScriptedOpenAIServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    provider = OpenAIProvider(api_key=API_KEY, base_url=model_server.base_url, max_retries=0, timeout_s=5)
    server = await start_server(Settings(port=0, store="memory"), app, models=provider)
    try:
        async with AgentdClient(server.target) as client:
            model_server.fail_next(1, 401, echo_authorization)
            events = await collect(client.run("assistant", "hi"))
            failed = events[-1].run_failed
            traces = await traces_seen_by_a_reader(client, events[0].trace_id)
    finally:
        await server.stop(grace_s=0)

    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_ERROR
    # The caller learns what failed and what to check, and nothing of the upstream body.
    assert "HTTP 401" in failed.message and "authentication failed" in failed.message
    for seen in (failed.message, traces):
        assert API_KEY not in seen and "sk-proj" not in seen and "Bearer" not in seen and "bad key" not in seen
    # The operator's log has the upstream detail, with the key redacted.
    log = agentd_log(caplog)
    assert "HTTP 401" in log and "bad key Bearer" in log
    assert API_KEY not in caplog.text and "Zq8vT3x" not in caplog.text


async def test_other_upstream_errors_are_forwarded_with_credentials_redacted(
    model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    provider = OpenAIProvider(api_key=API_KEY, base_url=model_server.base_url, max_retries=0, timeout_s=5)
    server = await start_server(Settings(port=0, store="memory"), app, models=provider)
    try:
        async with AgentdClient(server.target) as client:
            model_server.fail_next(1, 400, lambda h: f"header Authorization: {h['Authorization']} is malformed")
            events = await collect(client.run("assistant", "hi"))
    finally:
        await server.stop(grace_s=0)

    failed = events[-1].run_failed
    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_ERROR
    assert "HTTP 400" in failed.message and "is malformed" in failed.message
    assert API_KEY not in failed.message and "Zq8vT3x" not in failed.message


# -- 3. a tool's exception message in traces -------------------------------------------


def explode_with_personal_data() -> Script:
    return Script.of(calls(call("explode", reason=PERSONAL)), say("Sorry, that failed."))


async def test_a_tools_exception_message_stays_out_of_traces_when_content_is_off(harness) -> None:
    harness.model.set_script("assistant", explode_with_personal_data())
    events = await collect(harness.client.run("assistant", "charge my card"))
    assert events[-1].WhichOneof("payload") == "run_completed"

    # The model, the tool's own audience, still reads the failure in full.
    (result,) = [o.item.tool_result for o in of_kind(events, "tool_output")]
    assert result.is_error and f"RuntimeError: boom: {PERSONAL}" in result.output
    tool_messages = [m for m in harness.model.requests[-1]["messages"] if m["role"] == "tool"]
    assert PERSONAL in tool_messages[0]["content"]

    # A trace reader sees that the tool failed, and how, but not the message.
    traces = await traces_seen_by_a_reader(harness.client, events[0].trace_id)
    # (Matched with its spaces: random hex ids may well contain "4111".)
    assert "4111 1111" not in traces and "Alice" not in traces
    detail = await harness.client.get_trace(events[0].trace_id)
    (span,) = [s for s in detail.spans if s.name == "explode"]
    assert span.status == trace_service_pb2.SPAN_STATUS_ERROR and "RuntimeError" in span.error_message


async def test_a_tools_exception_message_is_traced_when_content_is_on(
    model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    h = await start_harness(model_server, tmp_path, trace_content=True)
    try:
        h.model.set_script("assistant", explode_with_personal_data())
        events = await collect(h.client.run("assistant", "charge my card"))
        detail = await h.client.get_trace(events[0].trace_id)
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
    (span,) = [s for s in detail.spans if s.name == "explode"]
    assert span.status == trace_service_pb2.SPAN_STATUS_ERROR and f"RuntimeError: boom: {PERSONAL}" in span.error_message


async def test_otlp_spans_follow_the_same_rule(
    model_server: ScriptedOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        h = await start_harness(model_server, tmp_path)  # trace content off
        try:
            h.model.set_script("assistant", explode_with_personal_data())
            events = await collect(h.client.run("assistant", "charge my card"))
            spans = await receiver.wait_for(events[0].trace_id, 5)
            stored = await traces_seen_by_a_reader(h.client, events[0].trace_id)
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)

    (tool,) = [s for s in spans if s.name == "execute_tool explode"]
    assert tool.status.code == Status.STATUS_CODE_ERROR and "RuntimeError" in tool.status.message
    for seen in (str(spans), stored):
        assert "4111 1111" not in seen and "Alice" not in seen


async def test_an_app_exception_reaches_the_caller_and_the_trace_as_its_type_only(harness) -> None:
    events = await collect(harness.client.run("assistant", "hello", context={"break_instructions": True}))
    failed = events[-1].run_failed
    assert events[-1].WhichOneof("payload") == "run_failed" and failed.code == run_event_pb2.RUN_ERROR_CODE_INTERNAL
    assert "LookupError" in failed.message and "server log" in failed.message
    assert "alice@example.com" not in failed.message and "4111 1111" not in failed.message
    traces = await traces_seen_by_a_reader(harness.client, events[0].trace_id)
    assert "alice@example.com" not in traces and "4111 1111" not in traces
