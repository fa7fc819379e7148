"""Operating agents: capacity metrics, GetLiveStats, ``agentd top``, and dashboards and alerts
that cannot rot.

- The dashboard (deploy/grafana/dashboards/agentd.json) and the alert rules
  (deploy/prometheus/alerts.yml) may name only what agentd really exports: two real servers
  sharing a Redis run store export over OTLP to a receiver here, runs exercise every metric
  (completed, failed, tool errors, priced and unpriced model calls, a takeover after a lease
  expired, a drain's hand-off), the exported names and attributes are translated with the
  Collector's Prometheus naming rules (tests/prometheus_names.py, the settings
  deploy/otel-collector.yaml pins), and every metric, label, matcher value and legend of every
  expression must be among them.
- GetLiveStats answers a replica's live state (active, queued, leases, capacity) and the recent
  runs from the archive; the queue's depth is read as each run store counts it.
- ``agentd top`` against three real replicas sharing Postgres and Redis: every frame shows every
  replica's row, a replica that does not answer as down, and the totals.

Everything synchronises on events (run events, exported metrics, archived runs): no sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from agentd.server import Script, call, calls, say
from agentd.server.runs.records import SessionPolicy
from agentd.server.tracing.capacity import QueueDepth
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import run_event_pb2, stats_service_pb2, stats_service_pb2_grpc
from tests.apps import tool_log
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix
from tests.backends_runs import ENGINES, run_replicas
from tests.cluster import ROOT, cluster, free_port
from tests.conftest import Harness, start_harness
from tests.otlp_receiver import OtlpMetricsReceiver, OtlpReceiver, data_points, point_attributes, value_of
from tests.prometheus_names import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    Series,
    grafana_label_values,
    label_name,
    metric_name,
    promql_usage,
    series_of,
)
from tests.runs_util import collect, kinds, wait_for_actions
from tests.test_run_stores import spec

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "agentd.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
COLLECTOR = DEPLOY / "otel-collector.yaml"
# Metrics Prometheus makes itself (not agentd's), which the alerts may use, with their labels.
PROMETHEUS_OWN = {"up": {"job", "instance"}}
GUARD_S = 60.0  # a bound on a hang, never a measured time
REJECT, ENQUEUE = SessionPolicy.REJECT, SessionPolicy.ENQUEUE

ASK_CUSTOMER = Script.of(calls(call("lookup_customer", customer_id="c-7")), say("Customer found."))


def write_prices(path: Path, models: dict[str, dict[str, str]]) -> Path:
    lines = ["currency: USD", "models:"]
    for model, entry in models.items():
        lines += [f"  {model}:", *(f"    {key}: {value}" for key, value in entry.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the naming rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "unit", "kind", "expected"), [
    # prometheus/otlptranslator's own cases (metric_namer_test.go, with suffixes, underscore escaping)
    ("simple_metric", "", GAUGE, "simple_metric"),
    ("metric@with#special$chars", "", GAUGE, "metric_with_special_chars"),
    ("123metric", "", GAUGE, "_123metric"),
    ("metric@@##$$name", "", GAUGE, "metric_name"),
    ("requests", "", COUNTER, "requests_total"),
    ("cpu_usage", "1", GAUGE, "cpu_usage_ratio"),
    ("items", "1", COUNTER, "items_total"),
    ("response_time", "ms", GAUGE, "response_time_milliseconds"),
    ("memory_usage", "By", GAUGE, "memory_usage_bytes"),
    ("requests", "1/s", GAUGE, "requests_per_second"),
    ("throughput", "By/s", GAUGE, "throughput_bytes_per_second"),
    ("custom_metric", "custom_unit", GAUGE, "custom_metric_custom_unit"),
    ("custom_metric", "{custom}", GAUGE, "custom_metric"),
    ("custom_metric", "By/{custom}", GAUGE, "custom_metric_bytes"),
    ("requests_total", "", COUNTER, "requests_total"),
    ("response_time_seconds", "s", GAUGE, "response_time_seconds"),
    ("cpu_seconds_total", "s", COUNTER, "cpu_seconds_total"),
    ("http.server.duration", "s", HISTOGRAM, "http_server_duration_seconds"),
    # agentd's
    ("agentd.runs", "{run}", COUNTER, "agentd_runs_total"),
    ("agentd.run.duration", "s", HISTOGRAM, "agentd_run_duration_seconds"),
    ("agentd.model.cost", "USD", COUNTER, "agentd_model_cost_USD_total"),
    ("agentd.model.unpriced_calls", "{call}", COUNTER, "agentd_model_unpriced_calls_total"),
    ("gen_ai.client.token.usage", "{token}", HISTOGRAM, "gen_ai_client_token_usage"),
    ("agentd.runs.active", "{run}", GAUGE, "agentd_runs_active"),
    ("agentd.run_store.write.duration", "s", HISTOGRAM, "agentd_run_store_write_duration_seconds"),
])
def test_prometheus_names_follow_otlptranslator(name: str, unit: str, kind: str, expected: str) -> None:
    assert metric_name(name, unit, kind) == expected


def test_label_names_and_promql_usage() -> None:
    assert label_name("gen_ai.agent.name") == "gen_ai_agent_name"
    assert label_name("agentd.run.status") == "agentd_run_status"
    assert label_name("1st.try") == "key_1st_try"
    usage = promql_usage(
        'histogram_quantile(0.95, sum by (le, gen_ai_agent_name) (rate(agentd_run_duration_seconds_bucket'
        '{gen_ai_agent_name=~"$agent", agentd_run_status="failed"}[$__rate_interval]))) > 2 '
        'unless on (agentd_replica) max by (agentd_replica) (last_over_time(agentd_leases_held[30m] offset 5m))'
    )
    assert usage.metrics == {"agentd_run_duration_seconds_bucket", "agentd_leases_held"}
    assert usage.grouping_labels == {"le", "gen_ai_agent_name", "agentd_replica"}
    assert usage.matchers == [("gen_ai_agent_name", "=~", "5m"), ("agentd_run_status", "=", "failed")]
    assert promql_usage("deriv(max(agentd_runs_queued)[10m:1m]) > 0 and up == 0").metrics == {
        "agentd_runs_queued", "up"}


def test_the_collector_pins_the_naming_the_dashboards_rely_on() -> None:
    config = yaml.safe_load(COLLECTOR.read_text())
    exporter = config["exporters"]["prometheus"]
    assert exporter["endpoint"] == "0.0.0.0:8889"
    assert exporter["translation_strategy"] == "UnderscoreEscapingWithSuffixes"
    assert exporter["resource_to_telemetry_conversion"] == {"enabled": False}
    assert "namespace" not in exporter and "const_labels" not in exporter
    assert config["service"]["pipelines"]["metrics"]["exporters"] == ["prometheus"]
    assert "debug" in config["exporters"], "the debug exporter stays available, off the pipeline"


# -- metric names cannot rot ----------------------------------------------------------------------


class AllMetrics(OtlpMetricsReceiver):
    """Keeps every exported data point (OtlpMetricsReceiver keeps the last export per name only,
    and two servers export here)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: dict[str, tuple[str, str]] = {}  # name -> (unit, kind)
        self.points: dict[str, list[tuple[dict[str, object], dict[str, object], Any]]] = {}

    async def Export(self, request, context):  # noqa: N802 (gRPC method name)
        for resource_metrics in request.resource_metrics:
            resource = {a.key: value_of(a.value) for a in resource_metrics.resource.attributes}
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    data = metric.WhichOneof("data")
                    if data == "sum":
                        kind = COUNTER if metric.sum.is_monotonic else GAUGE
                    else:
                        kind = {"gauge": GAUGE, "histogram": HISTOGRAM}[data]
                    self.kinds[metric.name] = (metric.unit, kind)
                    self.points.setdefault(metric.name, []).extend(
                        (resource, point_attributes(point), point) for point in data_points(metric))
        return await super().Export(request, context)

    def latest(self, name: str) -> dict[tuple[object, tuple], Any]:
        """The latest point of each (replica instance, attributes) of ``name``."""
        found: dict[tuple[object, tuple], Any] = {}
        for resource, attributes, point in self.points.get(name, []):
            found[(resource.get("service.instance.id"), tuple(sorted(attributes.items())))] = point
        return found

    def catalogue(self) -> dict[str, Series]:
        """Every Prometheus series name agentd's exports become, with its labels and their values."""
        result: dict[str, Series] = {}
        for name, (unit, kind) in self.kinds.items():
            attribute_sets = [attributes for _, attributes, _ in self.points[name]]
            for series in series_of(name, unit, kind, attribute_sets):
                for prometheus_name in series.names:
                    result[prometheus_name] = series
        return result


def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(where, expr, legend) of every target of every panel, rows' nested panels included."""
    board = json.loads(DASHBOARD.read_text())
    found = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            if panel.get("type") == "row":
                visit(panel.get("panels", []))
                continue
            assert panel.get("targets"), f"panel {panel.get('title')!r} has no query"
            for target in panel["targets"]:
                found.append((f"dashboard panel {panel['title']!r}", target["expr"], target.get("legendFormat", "")))

    visit(board["panels"])
    return found


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def check_expression(where: str, expr: str, catalogue: dict[str, Series], problems: list[str]) -> set[str]:
    """Problems with ``expr``'s names against the catalogue; returns the labels its result may carry."""
    usage = promql_usage(expr)
    available: set[str] = set()
    values: dict[str, set[str]] = {}
    for metric in usage.metrics:
        if metric in PROMETHEUS_OWN:
            available |= PROMETHEUS_OWN[metric]
            continue
        series = catalogue.get(metric)
        if series is None:
            problems.append(f"{where}: {metric!r} is not a metric agentd exports (expr: {expr.strip()})")
            continue
        available |= series.labels
        for label, seen in series.values.items():
            values.setdefault(label, set()).update(seen)
    for label in usage.grouping_labels:
        if label not in available:
            problems.append(f"{where}: label {label!r} is on none of {sorted(usage.metrics)}")
    for label, op, value in usage.matchers:
        if label not in available:
            problems.append(f"{where}: matcher on {label!r}, a label none of {sorted(usage.metrics)} has")
        elif op == "=" and label in values and value not in values[label]:
            problems.append(f"{where}: {label}={value!r} never occurs (seen: {sorted(values[label])})")
    aggregated = bool(usage.grouping_labels) or re.search(r"\b(sum|max|min|avg|count)\s*\(", expr) is not None
    return usage.grouping_labels if aggregated else available


async def test_dashboard_and_alerts_name_only_what_agentd_exports(
    model_server: ScriptedOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool_log.clear()
    prefix = new_prefix()
    prices = write_prices(tmp_path / "prices.yaml", {"assistant": {"input": "0.25", "output": "2.0"}})
    shared = dict(run_store="redis", redis_url=REDIS_URL, redis_prefix=prefix, run_lease_s=1.0, prices_file=prices)
    async with OtlpReceiver() as traces, AllMetrics() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{traces.port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "agentd")
        started: list[Harness] = []
        try:
            for name in ("replica-a", "replica-b"):
                monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"service.instance.id={name}")
                started.append(await start_harness(model_server, tmp_path, sqlite_path=tmp_path / f"{name}.db",
                                                   replica_id=name, **shared))
            a, b = started

            # Completed on a: tools (one raising, one the agent does not have), a priced model (assistant)
            # and, after a handoff, an unpriced one (specialist).
            conversation = Script.of(
                calls(call("get_weather", city="Paris"), call("explode", reason="fuse"), call("no_such_tool")),
                calls(call("transfer_to_specialist")),
                say("Paris is 21 degrees."),
            )
            a.model.set_script("assistant", conversation)
            a.model.set_script("specialist", conversation)
            assert kinds(await collect(a.client.run("assistant", "Weather?")))[-1] == "run_completed"
            # Failed: the model answers 500 through the client's retries.
            model_server.fail_next(3, status=500, retry_after_s=0.01)
            assert kinds(await collect(a.client.run("assistant", "Weather?")))[-1] == "run_failed"

            # A takeover: a's run waits for the caller; a stops renewing its lease (its background tasks
            # end, the process goes on); b requeues the run when the lease expires and resumes it.
            a.model.set_script("operator", ASK_CUSTOMER)
            taken = (await a.client.create_run("operator", "find c-7")).name.removeprefix("runs/")
            ((_, lookup),) = await wait_for_actions(a.client, taken, 1)
            await a.server.runs.close()
            resumed = [e async for e in _events_until(b, taken, "run_resumed")]
            assert resumed[-1].run_resumed.attempt == 2
            await b.client.submit_tool_output(taken, lookup, '{"name": "Ada"}')
            assert [e async for e in _events_until(b, taken, "run_completed")]

            # A hand-off: b drains with a run waiting for the caller and releases it to the queue.
            b.model.set_script("operator", ASK_CUSTOMER)
            handed = (await b.client.create_run("operator", "find c-8")).name.removeprefix("runs/")
            await wait_for_actions(b.client, handed, 1)
            await b.client.close()
            await b.server.stop(grace_s=0)  # the final export carries the hand-off
            started.remove(b)
            # Queued again, with b's checkpoint (nobody claims it: a's loops ended); a ends it.
            assert (await a.client.get_run(handed)).status == apb.RUN_STATUS_QUEUED
            await a.client.cancel_run(handed, "test over")
        finally:
            for h in started:
                await h.client.close()
                await h.server.stop(grace_s=0)
            await delete_prefix(prefix)

        def exported(metrics: dict) -> bool:
            return all(
                any(resource.get("service.instance.id") == "replica-b" and p.as_int == 1
                    for resource, _, p in receiver.points.get(counter, []))
                for counter in ("agentd.runs.taken_over", "agentd.runs.handed_off")
            )

        await receiver.wait_until(exported, timeout_s=GUARD_S)

    catalogue = receiver.catalogue()

    # The capacity metrics, per replica, with what happened.
    replicas = {"replica-a", "replica-b"}
    for name in ("agentd.runs.active", "agentd.runs.max_active", "agentd.runs.queued", "agentd.leases.held",
                 "agentd.runs.taken_over", "agentd.runs.handed_off", "agentd.leases.renewal_failures",
                 "agentd.run_store.write.duration"):
        assert {a["agentd.replica"] for _, a, _ in receiver.points[name]} == replicas, name
        assert all(r["service.instance.id"] == a["agentd.replica"] for r, a, _ in receiver.points[name]), name
    latest = {name: {key[0]: point for key, point in receiver.latest(name).items()}
              for name in ("agentd.runs.taken_over", "agentd.runs.handed_off", "agentd.leases.renewal_failures",
                           "agentd.run_store.write.duration", "agentd.runs.max_active")}
    assert {r: p.as_int for r, p in latest["agentd.runs.taken_over"].items()} == {"replica-a": 0, "replica-b": 1}
    assert {r: p.as_int for r, p in latest["agentd.runs.handed_off"].items()} == {"replica-a": 0, "replica-b": 1}
    assert {r: p.as_int for r, p in latest["agentd.leases.renewal_failures"].items()} == {"replica-a": 0,
                                                                                         "replica-b": 0}
    assert all(p.count > 0 and p.sum > 0 for p in latest["agentd.run_store.write.duration"].values())
    assert {r: p.as_int for r, p in latest["agentd.runs.max_active"].items()} == {"replica-a": 1000,
                                                                                 "replica-b": 1000}
    # Time to first token, per run that got a token; cost of the priced model, unpriced calls of the other.
    ttft = [p for (_, attrs), p in receiver.latest("agentd.run.time_to_first_token").items()]
    assert sum(p.count for p in ttft) >= 1 and all(p.sum > 0 for p in ttft if p.count)
    cost = {dict(attrs)["gen_ai.request.model"]: p.as_double
            for (_, attrs), p in receiver.latest("agentd.model.cost").items()}
    assert set(cost) == {"assistant"} and cost["assistant"] > 0
    unpriced = {dict(attrs)["gen_ai.request.model"] for (_, attrs), _ in receiver.latest(
        "agentd.model.unpriced_calls").items()}
    assert "specialist" in unpriced

    # Every name the dashboard and the alerts use is one of those.
    problems: list[str] = []
    used: set[str] = set()
    for where, expr, legend in dashboard_expressions():
        result_labels = check_expression(where, expr, catalogue, problems)
        used |= promql_usage(expr).metrics
        for label in re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend):
            if label not in result_labels:
                problems.append(f"{where}: legend {{{{{label}}}}} is not a label of the result {sorted(result_labels)}")
    board = json.loads(DASHBOARD.read_text())
    for variable in board["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        parsed = grafana_label_values(query)
        assert parsed, f"variable {variable['name']}: {query!r} is not label_values(metric, label)"
        metric, label = parsed
        if metric not in catalogue or label not in catalogue[metric].labels:
            problems.append(f"variable {variable['name']}: {metric}/{label} is not exported")
    for rule in alert_rules():
        where = f"alert {rule['alert']}"
        result_labels = check_expression(where, rule["expr"], catalogue, problems)
        used |= promql_usage(rule["expr"]).metrics
        for text in rule.get("annotations", {}).values():
            for label in re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", text):
                if label not in result_labels:
                    problems.append(f"{where}: annotation names $labels.{label}, not a label of {sorted(result_labels)}")
    assert not problems, "\n".join(problems)

    # What the dashboard and the alerts are for is covered.
    needed = {
        "agentd_runs_total", "agentd_run_duration_seconds_bucket", "agentd_run_time_to_first_token_seconds_bucket",
        "gen_ai_client_token_usage_sum", "agentd_model_cost_USD_total", "agentd_model_unpriced_calls_total",
        "agentd_tool_errors_total", "agentd_runs_active", "agentd_runs_max_active", "agentd_runs_queued",
        "agentd_leases_held", "agentd_runs_taken_over_total", "agentd_runs_handed_off_total",
        "agentd_leases_renewal_failures_total", "agentd_run_store_write_duration_seconds_bucket",
    }
    assert needed <= used, sorted(needed - used)


async def _events_until(h: Harness, run_id: str, kind: str):
    """The run's events, from the start, up to and including the first ``kind`` one."""
    async for event in h.client.watch_run(run_id):
        yield event
        if event.WhichOneof("payload") == kind:
            return
        assert event.WhichOneof("payload") not in ("run_completed", "run_failed", "run_cancelled"), event


# -- GetLiveStats ------------------------------------------------------------------------------------


async def live(h: Harness, minutes: int = 0) -> stats_service_pb2.GetLiveStatsResponse:
    stub = stats_service_pb2_grpc.StatsServiceStub(h.client._channel)
    return await stub.GetLiveStats(stats_service_pb2.GetLiveStatsRequest(minutes=minutes), timeout=10)


async def test_live_stats_answer_the_replica_and_its_recent_runs(
    model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    prices = write_prices(tmp_path / "prices.yaml", {"assistant": {"input": "0.25", "output": "2.0"}})
    h = await start_harness(model_server, tmp_path, replica_id="live-1", max_active_runs=1, max_queued_runs=50,
                            prices_file=prices)
    try:
        idle = await live(h)
        assert (idle.replica, idle.active_runs, idle.leases_held, idle.max_active_runs) == ("live-1", 0, 0, 1)
        assert idle.HasField("queued_runs") and idle.queued_runs == 0 and idle.max_queued_runs == 50
        assert not idle.draining and idle.archive and idle.HasField("recent")

        h.model.set_script("assistant", Script.of(say("Hello.")))
        assert kinds(await collect(h.client.run("assistant", "Hi")))[-1] == "run_completed"
        model_server.fail_next(3, status=500, retry_after_s=0.01)
        failed = await collect(h.client.run("assistant", "Hi"))
        assert kinds(failed)[-1] == "run_failed"

        # One run waits for the caller (the replica's one slot), the next is queued behind it.
        h.model.set_script("operator", ASK_CUSTOMER)
        waiting = (await h.client.create_run("operator", "find c-7")).name.removeprefix("runs/")
        ((_, lookup),) = await wait_for_actions(h.client, waiting, 1)
        queued = await h.client.create_run("operator", "find c-8")
        assert queued.status == apb.RUN_STATUS_QUEUED

        deadline = time.monotonic() + GUARD_S
        while True:  # the two ended runs count once their traces are archived (within the flush interval)
            answer = await live(h, minutes=3)
            if answer.recent.runs == 2:
                break
            assert time.monotonic() < deadline, answer
            await asyncio.sleep(0.05)
        assert (answer.active_runs, answer.leases_held, answer.queued_runs) == (1, 1, 1)
        recent = answer.recent
        assert len(recent.runs_per_minute) == 3 and sum(recent.runs_per_minute) == 2
        assert (recent.completed_runs, recent.failed_runs, recent.cancelled_runs) == (1, 1, 0)
        assert recent.success_rate == 0.5
        code = failed[-1].run_failed.code
        assert [(e.code, e.runs) for e in recent.top_errors] == [(code, 1)]
        assert recent.runs_today == 2 and recent.unpriced_runs_today == 0
        assert recent.cost_today.currency_code == "USD" and (recent.cost_today.units or recent.cost_today.nanos)
        assert recent.end_time == answer.read_time
        assert recent.start_time.ToNanoseconds() % 60_000_000_000 == 0
        assert recent.day_start_time.ToNanoseconds() % 86_400_000_000_000 == 0

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live(h, minutes=61)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "minutes" in caught.value.details()

        await h.client.submit_tool_output(waiting, lookup, '{"name": "Ada"}')
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_live_stats_answer_the_live_state_when_the_archive_fails(
    model_server: ScriptedOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentd.server.runtime.errors import StoreUnavailableError
    from agentd.server.tracing.store import TraceStore

    async def down(self, query):
        raise StoreUnavailableError("sqlite trace archive at /x: disk I/O error")

    h = await start_harness(model_server, tmp_path, replica_id="live-2")
    try:
        monkeypatch.setattr(TraceStore, "stats", down)
        answer = await live(h)
        assert answer.replica == "live-2" and answer.max_active_runs == 1000
        assert not answer.HasField("recent") and "disk I/O error" in answer.recent_error
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


@pytest.mark.parametrize("engine", ENGINES)
async def test_queue_depth_counts_what_max_queued_runs_bounds(engine: str) -> None:
    """Claimable runs and runs waiting behind their session's active run, as every engine's
    create_run counts toward max_queued; running and ended runs are not queued."""
    async with run_replicas(engine) as replica:
        store, _ = await replica()
        depth = QueueDepth(store)
        assert await depth.read() == 0
        now = time.time()
        running = spec(session="s")
        await store.create_run(running, policy=REJECT, owner="r1", lease_s=30, max_queued=10, now=now)
        for _ in range(2):  # behind the session's running run
            await store.create_run(spec(session="s"), policy=ENQUEUE, owner="r1", lease_s=30, max_queued=10, now=now)
        for _ in range(3):  # claimable
            await store.create_run(spec(), policy=REJECT, owner=None, lease_s=30, max_queued=10, now=now)
        assert await depth.read() == 5
        assert len(await store.claim("r2", 2, lease_s=30, now=time.time(), wait_s=0)) == 2
        assert await depth.read() == 3


# -- agentd top against three replicas ------------------------------------------------------------------


FRAME = re.compile(r"^agentd top · ", re.M)


def frames_of(output: str) -> list[str]:
    starts = [m.start() for m in FRAME.finditer(output)]
    return [output[start:end] for start, end in zip(starts, starts[1:] + [len(output)])]


def row(frame: str, first: str) -> list[str]:
    rows = [line.split() for line in frame.splitlines() if line.split()[:1] == [first]]
    assert len(rows) == 1, f"no single row for {first!r} in:\n{frame}"
    return rows[0]


async def test_top_shows_every_replica_and_the_totals(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    async with cluster(model_server, tmp_path, replicas=3, max_active_runs=4) as c:
        r1, r2, r3 = c.replicas
        clients = {r.name: c.client(r) for r in c.replicas}
        try:
            # Runs waiting for the caller keep their replica's slot: 1 on replica-1, 2 on replica-2.
            model_server.set_script("operator", ASK_CUSTOMER)
            waiting = []
            for replica, count in ((r1, 1), (r2, 2)):
                for n in range(count):
                    run = await clients[replica.name].create_run("operator", f"find c-{n}")
                    assert run.replica == replica.name
                    waiting.append((replica.name, run.name.removeprefix("runs/")))
            for name, run_id in waiting:
                await wait_for_actions(clients[name], run_id, 1)
            # An ended run on replica-3 (the memory trace store: its own figures).
            model_server.set_script("assistant", Script.of(say("Hello.")))
            assert kinds(await collect(clients[r3.name].run("assistant", "Hi")))[-1] == "run_completed"
            stub = stats_service_pb2_grpc.StatsServiceStub(clients[r3.name]._channel)
            deadline = time.monotonic() + GUARD_S
            while (await stub.GetLiveStats(stats_service_pb2.GetLiveStatsRequest(), timeout=10)).recent.runs != 1:
                assert time.monotonic() < deadline, "the run never counted"
                await asyncio.sleep(0.05)

            closed = f"127.0.0.1:{free_port()}"  # nothing listens: a replica that is down
            targets = ",".join([*c.targets, closed])
            env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
            env.pop("AGENTD_TARGET", None)
            done = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agentd.cli.main", "top", "--target", targets, "--iterations", "3",
                "--interval", "0.2", cwd=ROOT, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(done.communicate(), timeout=GUARD_S)
            assert done.returncode == 0, err.decode()
            output = out.decode()
            assert "\x1b[" not in output, "not a terminal: plain frames, no escape codes"
            frames = frames_of(output)
            assert len(frames) == 3, output
            for frame in frames:
                assert "3 of 4 replica(s) up" in frame.splitlines()[0], frame
                expected = {r1.name: "1", r2.name: "2", r3.name: "0"}
                for replica in c.replicas:
                    cells = row(frame, replica.name)
                    active = expected[replica.name]
                    # replica state active queued leases capacity% target
                    assert cells[1:5] == ["up", active, "0", active], cells
                    assert cells[5:8] == [f"{active}/4", f"{int(active) * 25}%", replica.target], cells
                down = row(frame, closed)
                assert down[1] == "down", down
                assert f"{closed}: down (UNAVAILABLE" in frame, frame
                total = row(frame, "total")
                assert total[1:7] == ["3/4", "up", "3", "0", "3", "3/12"], total
                assert "last 5 min:" in frame and "success 100.0% (1 run(s))" in frame, frame
                assert "top errors: none" in frame and "today (UTC): cost $0.0000 · 1 run(s), 1 unpriced" in frame
        finally:
            for name, run_id in waiting:
                await clients[name].cancel_run(run_id, "test over")
            for client in clients.values():
                await client.close()


def test_top_rejects_bad_arguments() -> None:
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "agentd.cli.main", "top", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    bad = run("--interval", "0")
    assert bad.returncode == 2 and "positive number of seconds" in bad.stderr
    bad = run("--iterations", "-1", "--target", "127.0.0.1:1")
    assert bad.returncode == 2 and "--iterations" in bad.stderr
    bad = run("--target", " , ")
    assert bad.returncode == 2 and "no target" in bad.stderr


def test_top_renders_a_frame_without_replicas_up() -> None:
    from agentd.cli.top import Answer, frame, render

    text = render(frame([Answer("10.0.0.9:50051", error="UNAVAILABLE: refused")], minutes=5, interval_s=2),
                  width=100, terminal=False)
    assert "0 of 1 replica(s) up" in text and "10.0.0.9:50051: down (UNAVAILABLE: refused)" in text
    assert "last 5 min: unavailable (no replica answered)" in text
    assert run_event_pb2.RunErrorCode.Name(0) == "RUN_ERROR_CODE_UNSPECIFIED"


def _top_process(*args: str, **popen: Any) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("AGENTD_TARGET", None)
    return subprocess.Popen([sys.executable, "-m", "agentd.cli.main", "top", *args], cwd=ROOT, env=env, **popen)


def test_top_redraws_in_place_on_a_terminal_and_ctrl_c_exits_0() -> None:
    """On a terminal each frame starts with cursor-home + clear; SIGINT (Ctrl-C) ends the view with 0."""
    import pty
    import select
    import signal

    closed = f"127.0.0.1:{free_port()}"
    primary, replica = pty.openpty()
    process = _top_process("--target", closed, "--interval", "0.2", stdout=replica, stderr=subprocess.PIPE)
    os.close(replica)
    seen = b""
    try:
        deadline = time.monotonic() + GUARD_S
        while seen.count(b"agentd top") < 2:  # two frames drawn: it refreshes
            assert time.monotonic() < deadline and process.poll() is None, seen
            readable, _, _ = select.select([primary], [], [], 1.0)
            if readable:
                seen += os.read(primary, 65536)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=GUARD_S) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)
    text = seen.decode(errors="replace")
    assert text.count("\x1b[H\x1b[2J") >= 2 and text.index("\x1b[H\x1b[2J") < text.index("agentd top")
    assert "down" in text
