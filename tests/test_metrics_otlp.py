"""OpenTelemetry metrics: a real server derives run, model and tool metrics from its spans and
exports them over OTLP/gRPC to a loopback receiver."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentd.server import Script, call, calls, say
from agentd.testing import ScriptedOpenAIServer
from tests.apps import tool_log
from tests.conftest import start_harness
from tests.otlp_receiver import OtlpMetricsReceiver, OtlpReceiver, data_points, point_attributes
from tests.runs_util import collect, kinds


@pytest.fixture
def otlp_env(monkeypatch: pytest.MonkeyPatch):
    def configure(trace_port: int, metrics_port: int, interval_ms: int) -> None:
        # Traces and metrics to their own receivers: the per-signal endpoint is honoured.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{trace_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{metrics_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", str(interval_ms))
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "agentd-test")

    return configure


def points(metrics: dict, name: str) -> list[tuple[dict[str, object], object]]:
    return [(point_attributes(p), p) for p in data_points(metrics[name])] if name in metrics else []


def runs_by_status(metrics: dict) -> dict[tuple[object, object], int]:
    return {
        (a["gen_ai.agent.name"], a["agentd.run.status"]): p.as_int for a, p in points(metrics, "agentd.runs")
    }


async def test_runs_model_calls_and_tools_are_measured_over_otlp(
    model_server: ScriptedOpenAIServer, tmp_path: Path, otlp_env
) -> None:
    tool_log.clear()
    async with OtlpReceiver() as traces, OtlpMetricsReceiver() as receiver:
        otlp_env(traces.port, receiver.port, interval_ms=200)
        h = await start_harness(model_server, tmp_path)
        try:
            # 1. Completed: a tool, a failing tool, a tool the agent does not have, a handoff, an answer.
            conversation = Script.of(
                calls(call("get_weather", city="Paris"), call("explode", reason="fuse"), call("no_such_tool")),
                calls(call("transfer_to_specialist")),
                say("Paris is 21 degrees."),
            )
            h.model.set_script("assistant", conversation)
            h.model.set_script("specialist", conversation)
            completed = await collect(h.client.run("assistant", "Weather?"))
            assert kinds(completed)[-1] == "run_completed"

            # 2. Failed: the model endpoint keeps answering 500 through the client's 2 retries.
            model_server.fail_next(3, status=500, retry_after_s=0.01)
            failed = await collect(h.client.run("assistant", "Weather?"))
            assert kinds(failed)[-1] == "run_failed"

            # 3. Cancelled by the client while a tool runs.
            h.model.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="long")), say("never")))
            stream = h.client.run("assistant", "wait forever")
            async for event in stream:
                if event.WhichOneof("payload") == "tool_called":
                    await asyncio.sleep(0.05)
                    await stream.cancel("user pressed stop")
            assert tool_log.cancelled == ["long"]

            def all_runs_exported(metrics: dict) -> bool:
                return sum(runs_by_status(metrics).values()) == 3

            await receiver.wait_until(all_runs_exported, timeout_s=5)
            metrics = dict(receiver.metrics)
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)

    assert receiver.resources[-1]["service.name"] == "agentd-test"

    # Runs: by the agent the run started with, and its outcome.
    assert metrics["agentd.runs"].sum.is_monotonic
    assert runs_by_status(metrics) == {
        ("assistant", "completed"): 1,
        ("assistant", "failed"): 1,
        ("assistant", "cancelled"): 1,
    }
    durations = {(a["gen_ai.agent.name"], a["agentd.run.status"]): p for a, p in points(metrics, "agentd.run.duration")}
    assert {key: p.count for key, p in durations.items()} == runs_by_status(metrics)
    assert all(p.sum > 0 for p in durations.values())
    assert metrics["agentd.run.duration"].unit == "s"

    # Model calls: one point per model (and per error.type for failed calls); counts are calls.
    operations = {
        (a["gen_ai.request.model"], a.get("error.type")): p for a, p in points(metrics, "gen_ai.client.operation.duration")
    }
    assert all(a["gen_ai.operation.name"] == "chat" for a, _ in points(metrics, "gen_ai.client.operation.duration"))
    # assistant: 2 turns in run 1 + 1 in run 3 (cancelled while its tool ran); specialist: 1.
    assert {key: p.count for key, p in operations.items()} == {
        ("assistant", None): 3,
        ("specialist", None): 1,
        ("assistant", "500"): 1,  # the failed run's call, retries included
    }
    assert list(operations[("assistant", None)].explicit_bounds)[:3] == [0.01, 0.02, 0.04]

    tokens = {(a["gen_ai.request.model"], a["gen_ai.token.type"]): p for a, p in points(metrics, "gen_ai.client.token.usage")}
    assert set(tokens) == {("assistant", "input"), ("assistant", "output"), ("specialist", "input"), ("specialist", "output")}
    assert tokens[("assistant", "input")].count == 3 and tokens[("specialist", "output")].count == 1
    assert all(p.sum > 0 for p in tokens.values())
    assert metrics["gen_ai.client.token.usage"].unit == "{token}"
    assert list(tokens[("assistant", "input")].explicit_bounds)[:3] == [1, 4, 16]

    # Tools: durations for every call; errors for failed calls, with a low-cardinality error.type.
    tools = {(a["gen_ai.tool.name"], a.get("error.type")): p.count for a, p in points(metrics, "agentd.tool.duration")}
    assert tools == {
        ("get_weather", None): 1,
        ("explode", "RuntimeError"): 1,
        ("_OTHER", "unknown_tool"): 1,  # a name the model made up is not a metric attribute
        ("wait", "cancelled"): 1,
    }
    errors = {(a["gen_ai.tool.name"], a["error.type"]): p.as_int for a, p in points(metrics, "agentd.tool.errors")}
    # A tool cancelled with its run is the run's cancellation, not a tool error.
    assert errors == {("explode", "RuntimeError"): 1, ("_OTHER", "unknown_tool"): 1}


async def test_metrics_are_flushed_when_the_server_stops(
    model_server: ScriptedOpenAIServer, tmp_path: Path, otlp_env
) -> None:
    async with OtlpReceiver() as traces, OtlpMetricsReceiver() as receiver:
        otlp_env(traces.port, receiver.port, interval_ms=60_000)  # no periodic export during the test
        h = await start_harness(model_server, tmp_path)
        try:
            h.model.set_script("assistant", Script.of(say("Hello.")))
            events = await collect(h.client.run("assistant", "Hi"))
            assert kinds(events)[-1] == "run_completed"
            assert receiver.exports == 0
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)
        assert runs_by_status(receiver.metrics) == {("assistant", "completed"): 1}


async def test_metrics_can_be_turned_off_while_traces_are_exported(
    model_server: ScriptedOpenAIServer, tmp_path: Path, otlp_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with OtlpReceiver() as traces, OtlpMetricsReceiver() as receiver:
        otlp_env(traces.port, receiver.port, interval_ms=50)
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        h = await start_harness(model_server, tmp_path)
        try:
            h.model.set_script("assistant", Script.of(say("Hello.")))
            events = await collect(h.client.run("assistant", "Hi"))
            await traces.wait_for(events[0].trace_id, 3)
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)
        assert receiver.exports == 0
