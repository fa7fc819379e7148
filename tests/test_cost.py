"""What runs cost (issue 16): a real server on loopback, the real client, the model reached through
the real openai client over HTTP (``ScriptedOpenAIServer``, whose token counts are deterministic,
with cached input tokens reported), and a price file written here.

Checked against a computation here (exact decimals, rounded once to nano-dollars, half to even):
the cost on ``usage_updated`` (the call's and the run's) and on the terminal event, on the trace
(GetTrace and ListTraces, while the run goes on, once it ended, and read back from the SQLite and
Postgres archives after a restart), on the spans, and on the ``agentd.model.cost`` metric over OTLP.
A model the table does not price is unknown (the field unset, counted unpriced), never 0; a
changed price file applies to later runs; a takeover keeps the run's cost; GetStats sums the
costs and error codes of real runs; a price file that does not load stops the server.
"""

from __future__ import annotations

import asyncio
import time
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from agentd.client import AgentdClient
from agentd.server import Script, call, calls, say
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.errors import AppConfigError
from agentd.server.runtime.events import UsageUpdated
from agentd.server.runtime.usage import Usage
from agentd.server.runs.codec import decode_checkpoint, decode_payload, encode_checkpoint, encode_payload
from agentd.server.serve import start_server
from agentd.server.settings import Settings
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import run_event_pb2
from agentd.v1 import stats_service_pb2 as spb
from agentd.v1 import stats_service_pb2_grpc as spb_grpc
from agentd.v1 import trace_service_pb2 as tpb
from tests.apps import app, tool_log
from tests.conftest import Harness, start_harness
from tests.otlp_receiver import OtlpMetricsReceiver, OtlpReceiver, data_points, point_attributes
from tests.runs_util import collect, kinds, of_kind
from tests.test_stats import backend_settings

NANO = Decimal(10) ** 9
# USD per 1M tokens, with enough decimals that rounding to the nano-dollar matters.
PRICES: dict[str, dict[str, str]] = {
    "assistant": {"input": "0.1234567", "cached_input": "0.0617283", "output": "0.9876543"},
    "specialist": {"input": "3.3333333", "output": "7.7777777"},
    "racer": {"input": "1.1111111", "output": "2.2222222"},
}
CACHED = 7  # the cached input tokens the scripted endpoint reports per call (of its input tokens)


def write_prices(path: Path, prices: dict[str, dict[str, str]]) -> Path:
    lines = ["currency: USD", "models:"]
    for model, entry in prices.items():
        lines.append(f"  {model}:")
        lines += [f"    {key}: {value}" for key, value in entry.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def exact(model: str, usage: run_event_pb2.TokenUsage, prices: dict[str, dict[str, str]] = PRICES) -> Decimal:
    """The exact US dollars of one call's (or calls' of one model) tokens at ``prices``."""
    price = {key: Decimal(value) for key, value in prices[model].items()}
    cached_price = price.get("cached_input", price["input"])
    reasoning_price = price.get("reasoning", price["output"])
    total = (
        (usage.input_tokens - usage.cached_input_tokens) * price["input"]
        + usage.cached_input_tokens * cached_price
        + (usage.output_tokens - usage.reasoning_tokens) * price["output"]
        + usage.reasoning_tokens * reasoning_price
    )
    return total / Decimal(1_000_000)


def nanos(amount: Decimal) -> int:
    return int((amount * NANO).to_integral_value(ROUND_HALF_EVEN))


def money(message: Any) -> int:
    """Whole nano-dollars of a ``google.type.Money`` (always USD)."""
    assert message.currency_code == "USD"
    assert message.units >= 0 and 0 <= message.nanos < 10**9
    return message.units * 10**9 + message.nanos


def span_nanos(value: Any) -> int:
    return nanos(Decimal(str(value)))


@pytest.fixture
def prices_file(tmp_path: Path) -> Path:
    return write_prices(tmp_path / "prices.yaml", PRICES)


@pytest.fixture
def otlp_env(monkeypatch: pytest.MonkeyPatch):
    def configure(trace_port: int, metrics_port: int) -> None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{trace_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{metrics_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")

    return configure


async def stop(h: Harness) -> None:
    await h.client.close()
    await h.server.stop(grace_s=0)


def handoff_script() -> Script:
    """assistant: a slow tool, then a handoff; specialist (same script, later turn): the answer."""
    return Script.of(
        calls(call("wait", seconds=0.4, label="slow")),
        calls(call("transfer_to_specialist")),
        say("Paris is 21 degrees."),
    )


# --- one run's cost, everywhere it is reported ------------------------------------------------


@pytest.mark.parametrize("archive", ["sqlite", "postgres"])
async def test_a_run_reports_its_exact_cost_on_events_traces_spans_and_metrics(
    archive: str, model_server: ScriptedOpenAIServer, tmp_path: Path, prices_file: Path, otlp_env
) -> None:
    tool_log.clear()
    model_server.cached_input_tokens = CACHED
    async with OtlpReceiver() as traces, OtlpMetricsReceiver() as receiver, backend_settings(archive) as settings:
        otlp_env(traces.port, receiver.port)
        h = await start_harness(model_server, tmp_path, prices_file=prices_file, **settings)
        try:
            h.model.set_script("assistant", handoff_script())
            h.model.set_script("specialist", handoff_script())
            events: list[run_event_pb2.RunEvent] = []
            live: tpb.GetTraceResponse | None = None
            async for event in h.client.run("assistant", "Weather in Paris?"):
                events.append(event)
                if event.WhichOneof("payload") == "tool_called" and live is None:
                    # The run is in its slow tool: its live trace has the first call's cost.
                    live = await h.client.get_trace(event.trace_id)
                    listed_live = await h.client.list_traces(status=tpb.SPAN_STATUS_IN_PROGRESS)
            assert kinds(events)[-1] == "run_completed", kinds(events)
            trace_id = events[0].trace_id

            # usage_updated: each call's exact cost at its model's prices, and the run's so far.
            updates = of_kind(events, "usage_updated")
            assert [(u.agent, u.model) for u in updates] == [
                ("assistant", "assistant"), ("assistant", "assistant"), ("specialist", "specialist")
            ]
            running = Decimal(0)
            for u in updates:
                assert u.turn.requests == 1 and u.turn.cached_input_tokens == CACHED < u.turn.input_tokens
                call_cost = exact(u.model, u.turn)
                running += call_cost
                assert u.turn.HasField("cost") and money(u.turn.cost) == nanos(call_cost)
                assert u.turn.unpriced_calls == 0
                assert money(u.run.cost) == nanos(running)  # the exact sum, rounded once
                assert u.run.unpriced_calls == 0
            total = nanos(running)
            assert total > 0

            done = events[-1].run_completed
            assert money(done.usage.cost) == total and done.usage.unpriced_calls == 0
            assert done.usage.requests == 3 and done.usage.cached_input_tokens == 3 * CACHED

            # The live trace, while the slow tool ran: the first call's cost, in progress.
            assert live is not None and live.trace.status == tpb.SPAN_STATUS_IN_PROGRESS
            first = nanos(exact("assistant", updates[0].turn))
            assert money(live.trace.cost) == first and live.trace.unpriced_calls == 0
            assert [money(t.cost) for t in listed_live.traces if t.trace_id == trace_id] == [first]

            # The ended trace (in memory), its spans, and the listing.
            detail = await h.client.get_trace(trace_id)
            assert detail.trace.status == tpb.SPAN_STATUS_OK
            assert money(detail.trace.cost) == total and detail.trace.unpriced_calls == 0
            (run_span,) = [s for s in detail.spans if s.kind == tpb.SPAN_KIND_RUN]
            run_attributes = dict(run_span.attributes)
            assert span_nanos(run_attributes["cost_usd"]) == total
            assert run_attributes["unpriced_calls"] == 0
            assert run_attributes["cached_input_tokens"] == 3 * CACHED and run_attributes["reasoning_tokens"] == 0
            assert 0 < run_attributes["ttft_ms"] < 10_000 and "error_code" not in run_attributes
            generations = [s for s in detail.spans if s.kind == tpb.SPAN_KIND_GENERATION]
            assert [span_nanos(s.attributes["cost_usd"]) for s in generations] == [
                nanos(exact(u.model, u.turn)) for u in updates
            ]
            assert all(s.attributes["cached_input_tokens"] == CACHED for s in generations)
            listed = await h.client.list_traces()
            (summary,) = [t for t in listed.traces if t.trace_id == trace_id]
            assert money(summary.cost) == total
        finally:
            await stop(h)  # flushes the traces to the archive and the metrics to the receiver

        # The metric: per agent, model and tenant, the priced calls' cost in USD; nothing unpriced.
        metrics = dict(receiver.metrics)
        assert metrics["agentd.model.cost"].unit == "USD"
        assert metrics["agentd.model.cost"].sum.is_monotonic
        measured = {
            (a["gen_ai.agent.name"], a["gen_ai.request.model"], a["agentd.tenant"]): p.as_double
            for a, p in ((point_attributes(p), p) for p in data_points(metrics["agentd.model.cost"]))
        }
        by_model: dict[str, float] = {}
        for u in updates:
            by_model[u.model] = by_model.get(u.model, 0.0) + nanos(exact(u.model, u.turn)) / 1e9
        assert measured.keys() == {("assistant", "assistant", "default"), ("specialist", "specialist", "default")}
        for (agent, model, _), value in measured.items():
            assert value == pytest.approx(by_model[model], rel=1e-12, abs=0)
        assert "agentd.model.unpriced_calls" not in metrics

        # Read back from the archive by a new server: the same cost, from the archive's column.
        h = await start_harness(model_server, tmp_path, prices_file=prices_file, **settings)
        try:
            assert h.server.traces.memory.get_trace(trace_id) is None
            archived = await h.client.get_trace(trace_id)
            assert money(archived.trace.cost) == total and archived.trace.unpriced_calls == 0
            assert len(archived.spans) == len(detail.spans)
            (summary,) = [t for t in (await h.client.list_traces()).traces if t.trace_id == trace_id]
            assert money(summary.cost) == total and summary.unpriced_calls == 0
        finally:
            await stop(h)


# --- unknown is never 0 ---------------------------------------------------------------------


async def test_an_unpriced_model_is_unknown_never_zero(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    # Only the assistant is priced: the reporter's calls are unknown, the specialist's too.
    prices = write_prices(tmp_path / "prices.yaml", {"assistant": PRICES["assistant"]})
    h = await start_harness(model_server, tmp_path, prices_file=prices)
    try:
        h.model.set_script("reporter", Script.of(say('{"city": "Paris", "temperature_c": 21, "summary": "sunny"}')))
        events = await collect(h.client.run("reporter", "Paris?"))
        assert kinds(events)[-1] == "run_completed", kinds(events)
        (update,) = of_kind(events, "usage_updated")
        assert not update.turn.HasField("cost") and update.turn.unpriced_calls == 1
        assert not update.run.HasField("cost") and update.run.unpriced_calls == 1
        done = events[-1].run_completed
        assert done.usage.requests == 1 and done.usage.input_tokens > 0
        assert not done.usage.HasField("cost") and done.usage.unpriced_calls == 1
        detail = await h.client.get_trace(events[0].trace_id)
        assert not detail.trace.HasField("cost") and detail.trace.unpriced_calls == 1
        for span in detail.spans:
            assert "cost_usd" not in span.attributes, span
        (run_span,) = [s for s in detail.spans if s.kind == tpb.SPAN_KIND_RUN]
        assert run_span.attributes["unpriced_calls"] == 1

        # Priced and unpriced calls in one run: the cost of the priced ones, a lower bound, said so.
        h.model.set_script("assistant", Script.of(calls(call("transfer_to_specialist")), say("Hi.")))
        h.model.set_script("specialist", Script.of(calls(call("transfer_to_specialist")), say("Hi.")))
        events = await collect(h.client.run("assistant", "Hello"))
        assert kinds(events)[-1] == "run_completed", kinds(events)
        first, second = of_kind(events, "usage_updated")
        assert money(first.turn.cost) == nanos(exact("assistant", first.turn))
        assert not second.turn.HasField("cost") and second.turn.unpriced_calls == 1
        done = events[-1].run_completed
        assert money(done.usage.cost) == money(first.turn.cost) and done.usage.unpriced_calls == 1
        detail = await h.client.get_trace(events[0].trace_id)
        assert money(detail.trace.cost) == money(first.turn.cost) and detail.trace.unpriced_calls == 1
    finally:
        await stop(h)

    # No price file at all: every call unpriced.
    h = await start_harness(model_server, tmp_path)
    try:
        h.model.set_script("assistant", Script.of(say("Hello.")))
        events = await collect(h.client.run("assistant", "Hi"))
        done = events[-1].run_completed
        assert not done.usage.HasField("cost") and done.usage.unpriced_calls == 1
    finally:
        await stop(h)


# --- prices change ------------------------------------------------------------------------------


async def test_a_changed_price_file_applies_to_later_runs(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    path = write_prices(tmp_path / "prices.yaml", PRICES)
    # The Responses API this time: its cached input tokens are read too.
    config = Settings(port=0, store="sqlite", sqlite_path=tmp_path / "agentd.db", prices_file=path,
                      prices_poll_interval_s=0.05)  # type: ignore[call-arg]
    provider = OpenAIProvider(api_key="test-key", base_url=model_server.base_url, timeout_s=10, max_retries=2,
                              api="responses")
    server = await start_server(config, app, models=provider)
    h = Harness(server, AgentdClient(server.target), model_server)
    model_server.cached_input_tokens = CACHED

    async def cost_of_a_run() -> tuple[int, run_event_pb2.TokenUsage]:
        events = await collect(h.client.run("assistant", "Hi"))
        assert kinds(events)[-1] == "run_completed", kinds(events)
        usage = events[-1].run_completed.usage
        assert usage.cached_input_tokens == CACHED
        return money(usage.cost), usage

    try:
        h.model.set_script("assistant", Script.of(say("Hello there.")))
        cost, usage = await cost_of_a_run()
        assert cost == nanos(exact("assistant", usage))
        assert model_server.requests and all("input" in body for body in model_server.requests)  # Responses API

        doubled = {"assistant": {key: str(Decimal(value) * 2) for key, value in PRICES["assistant"].items()}}
        write_prices(path, doubled)
        await asyncio.sleep(0.15)
        cost, usage = await cost_of_a_run()
        assert cost == nanos(exact("assistant", usage, doubled))

        path.write_text("models: [not, a, mapping\n", encoding="utf-8")  # broken: the last good prices stay
        await asyncio.sleep(0.15)
        cost, usage = await cost_of_a_run()
        assert cost == nanos(exact("assistant", usage, doubled))
    finally:
        await stop(h)


async def test_a_price_file_that_does_not_load_stops_the_server(
    model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    bad = tmp_path / "prices.yaml"
    bad.write_text("models:\n  gpt-x:\n    input: 1\n", encoding="utf-8")  # no output price
    with pytest.raises(AppConfigError, match=r"'output' \(USD per 1M tokens\) is required"):
        await start_harness(model_server, tmp_path, prices_file=bad)
    with pytest.raises(AppConfigError, match="cannot read the price file"):
        await start_harness(model_server, tmp_path, prices_file=tmp_path / "missing.yaml")


# --- a takeover keeps the cost ------------------------------------------------------------------


async def test_a_takeover_keeps_the_runs_cost(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    """The replica dies while the run's tool runs (after its first, priced, model call): the replica
    taking over resumes the cost from the checkpoint, and the run's cost is both calls'."""
    from tests.race_util import MODEL, Crash, intercept, reset_book, shared_stores, start_message, start_replica
    from tests.race_util import stop_replica, watch
    from agentd.v1 import agent_service_pb2 as apb

    book = reset_book()
    model_server.cached_input_tokens = CACHED
    model_server.set_script(MODEL, Script.of(calls(call("act", label="charge")), say("charged")))
    prices = write_prices(tmp_path / "prices.yaml", PRICES)
    async with shared_stores("redis", sessions=True) as stores:
        a = await start_replica(model_server, tmp_path, "replica-a", run_lease_s=1.0, prices_file=prices, **stores)
        b = await start_replica(model_server, tmp_path, "replica-b", run_lease_s=1.0, prices_file=prices, **stores)
        crash = Crash(a)
        try:
            killed = asyncio.Event()

            async def on_start(start: Any) -> None:
                if len(book.starts) == 1:  # on a: the replica dies the moment its tool started
                    crash.kill()
                    killed.set()

            book.on_start = on_start
            book.hold = {"charge"}

            async def progress(real: Any, run_id: str, attempt: int, events: Any, checkpoint: Any, **kw: Any) -> Any:
                if checkpoint is not None and checkpoint.pending:
                    await crash.checkpoint()
                return await real(run_id, attempt, events, checkpoint, **kw)

            intercept(a.store, "record_progress", progress)
            created = await a.client.agents.CreateRun(apb.CreateRunRequest(start=start_message(session="sessions/c")))
            run_id = created.run.name.split("/")[1]
            await killed.wait()
            await asyncio.gather(*a.server.runs._tasks, return_exceptions=True)
            await b.store.requeue_expired(now=time.time() + 10)
            events = await watch(b.client, run_id)

            assert kinds(events)[-1] == "run_completed", kinds(events)
            assert "run_resumed" in kinds(events)
            first, second = [e.usage_updated for e in events if e.WhichOneof("payload") == "usage_updated"]
            expected = exact(MODEL, first.turn) + exact(MODEL, second.turn)
            assert money(first.run.cost) == nanos(exact(MODEL, first.turn))  # a's call, logged before the crash
            assert money(second.run.cost) == nanos(expected) and second.run.requests == 2  # b resumed a's cost
            done = events[-1].run_completed
            assert money(done.usage.cost) == nanos(expected) and done.usage.unpriced_calls == 0
            assert done.usage.cached_input_tokens == 2 * CACHED
            trace = await b.client.get_trace(events[-1].trace_id)
            assert money(trace.trace.cost) == nanos(expected)
        finally:
            crash.end()
            book.release.set()
            await stop_replica(b)
            await stop_replica(a)


# --- GetStats over real runs ------------------------------------------------------------------


async def test_get_stats_sums_real_runs_costs_and_error_codes(
    model_server: ScriptedOpenAIServer, tmp_path: Path, prices_file: Path
) -> None:
    model_server.cached_input_tokens = CACHED
    h = await start_harness(model_server, tmp_path, prices_file=prices_file, trace_flush_interval_s=0.05)
    try:
        h.model.set_script("assistant", Script.of(say("Hello.")))
        completed = [await collect(h.client.run("assistant", f"Hi {n}")) for n in range(2)]
        model_server.fail_next(3, status=500, retry_after_s=0.01)  # through the client's 2 retries
        failed = await collect(h.client.run("assistant", "Hi again"))
        assert kinds(failed)[-1] == "run_failed"
        code = failed[-1].run_failed.code
        h.model.set_script("reporter", Script.of(say('{"city": "Oslo", "temperature_c": 12, "summary": "grey"}')))
        unpriced = await collect(h.client.run("reporter", "Oslo?"))
        assert kinds(unpriced)[-1] == "run_completed"

        stub = spb_grpc.StatsServiceStub(h.client._channel)

        async def groups() -> dict[str, spb.RunStats]:
            response = await stub.GetStats(spb.GetStatsRequest())
            return {g.agent.removeprefix("agents/"): g.totals for g in response.groups}

        deadline = time.monotonic() + 10
        found = await groups()
        while sum(s.runs for s in found.values()) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the traces reach the archive in the background
            found = await groups()

        assistant = found["assistant"]
        assert (assistant.runs, assistant.completed_runs, assistant.failed_runs) == (3, 2, 1)
        assert {e.code: e.runs for e in assistant.errors} == {code: 1}
        expected = sum(money(events[-1].run_completed.usage.cost) for events in completed)
        assert money(assistant.cost) == expected > 0 and assistant.unpriced_runs == 0
        assert assistant.cached_input_tokens == 2 * CACHED
        assert assistant.time_to_first_token.count == 2
        reporter = found["reporter"]
        assert reporter.runs == 1 and reporter.unpriced_runs == 1 and money(reporter.cost) == 0
    finally:
        await stop(h)


# --- what the stores keep ---------------------------------------------------------------------


def test_cost_survives_the_run_stores_encoding_and_older_entries_are_unpriced() -> None:
    call_usage = Usage(120, 30, 1, 4, 7, Decimal("0.0000123456789012"), 0)
    run_usage = Usage(240, 60, 2, 4, 14, Decimal("0.0000123456789012"), 1)
    event = UsageUpdated("a", "m", call_usage, run_usage)
    assert decode_payload(encode_payload(event)) == event
    checkpoint = Checkpoint("a", 2, run_usage, 0, (), (), "r/2", 5)
    assert decode_checkpoint(encode_checkpoint(checkpoint)).usage == run_usage
    # Written before costs were recorded: the calls' cost is unknown, so they count as unpriced.
    old = '{"agent":"a","turns":1,"usage":[10,5,2],"history_items":0,"run_items":[],"step_items":[],' \
          '"step_request_id":"r/1","sequence":3}'
    assert decode_checkpoint(old).usage == Usage(10, 5, 2, 0, 0, None, 2)
    # A run that made no call yet has nothing unpriced.
    assert decode_checkpoint(encode_checkpoint(Checkpoint("a", 0, Usage(), 0, (), (), "", 0))).usage == Usage()
