"""OpenTelemetry metrics derived from agentd's spans.

``MetricsSpanProcessor`` sits on the tracer provider next to the OTLP batch processor and
turns each ended span into measurements, so the run loop has one instrumentation (its
spans) and the metrics can never disagree with the traces:

=====================================  =========  ===============================================
metric                                 unit       attributes
=====================================  =========  ===============================================
``agentd.runs`` (counter)              {run}      gen_ai.agent.name, agentd.agent.version,
                                                  agentd.run.status, agentd.tenant
``agentd.run.duration``                s          gen_ai.agent.name, agentd.agent.version,
                                                  agentd.run.status, agentd.tenant
``agentd.run.time_to_first_token``     s          gen_ai.agent.name, agentd.agent.version,
                                                  agentd.run.status, agentd.tenant (runs that
                                                  got a model token: the run span's ttft_ms)
``gen_ai.client.operation.duration``   s          gen_ai.operation.name, gen_ai.request.model,
                                                  error.type (failed calls only)
``gen_ai.client.token.usage``          {token}    gen_ai.operation.name, gen_ai.request.model,
                                                  gen_ai.token.type (input | output)
``agentd.model.cost`` (counter)        USD        gen_ai.agent.name, gen_ai.request.model,
                                                  agentd.tenant
``agentd.model.unpriced_calls``        {call}     gen_ai.agent.name, gen_ai.request.model,
                                                  agentd.tenant
``agentd.tool.duration``               s          gen_ai.tool.name, error.type (failed calls only)
``agentd.tool.errors`` (counter)       {error}    gen_ai.tool.name, error.type
``agentd.guardrail.checks`` (counter)  {check}    agentd.guardrail.name, agentd.guardrail.stage,
                                                  agentd.guardrail.tripped, error.type (checks
                                                  that did not finish only)
``agentd.cache.lookups`` (counter)     {lookup}   gen_ai.agent.name, agentd.cache.result
                                                  (hit | miss); see ``CacheMetrics``
=====================================  =========  ===============================================

``gen_ai.agent.name`` on run metrics is the agent the run started with (handoffs do not
change it) and ``agentd.agent.version`` (an int) the version of it the run pinned: 1, 2, 3...
for an agent made through the API, 0 for an app-module or file agent; two versions behind a
split alias are measured apart. ``agentd.run.status`` is ``completed``, ``failed`` or ``cancelled``.
``agentd.tenant`` is the tenant owning the run, from the run span (``default`` without
authentication); tenants are configured, so it stays bounded. A tool
call cancelled with its run is timed but not counted in ``agentd.tool.errors``: the
cancellation is the run's (``agentd.run.status=cancelled``), not the tool's failure.

``agentd.model.cost`` (a float counter) adds each priced model call's cost in US dollars
(rounded to whole nano-dollars, as the span's ``agentd.cost_usd``), from the operator's price
table (``AGENTD_PRICES_FILE``); a successful call the table does not price adds 1 to
``agentd.model.unpriced_calls`` (a counter) instead, never 0 to the cost. Both cover the
agents' turns and history compaction; a classifier guardrail's model call is in neither (its cost is in
its run's figures: events, run span, StatsService). ``gen_ai.agent.name`` is the agent the
call was made for and ``agentd.tenant`` the tenant owning the run; model names come from the
app and its agent definitions, so the series stay bounded.

``agentd.guardrail.checks`` counts guardrail checks (``runtime.guardrails``) by guardrail,
stage (``input``, ``output``, ``tool_before``, ``tool_after``) and verdict
(``agentd.guardrail.tripped``, a bool); guardrail names come from the app and its agent
definitions, so they stay bounded. A check that did not finish (cancelled when another
input guardrail tripped first, or its code raised) has ``tripped=false`` and an
``error.type`` (``cancelled``, the exception class...).

Metric attributes must stay low-cardinality, so ``error.type`` is not the span's free-text
status but a short class of it: an HTTP status code (``"500"``), ``timeout``,
``unreachable``, ``cancelled``, an exception class name (``RuntimeError``),
``invalid_arguments``, ``unknown_tool``... or ``_OTHER``. Calls to a tool the agent does not
have (a model can invent any name) are recorded under ``gen_ai.tool.name=_OTHER``.

Recording is off the run's path. ``on_end`` (called where the span ends: the event loop)
only queues the span; the measurements are recorded from the queue on the same loop in
batches, ``RECORD_DELAY_S`` later (``RECORD_BATCH`` spans per callback), and every
collection (a periodic or final export, ``force_flush``, a reader's ``collect``) first
records whatever is queued, so an export always holds every span that ended before it.
Recording into the SDK's instruments costs ~7 µs per measurement (the SDK copies, cleans
and hashes the attributes of each), twelve per tool-calling run: done inline, that was the
largest part of what OTLP export added to a run's latency. A span ended with no running
event loop (another thread, synchronous code) is recorded at once. The measurements and
their times are those of the spans either way. Export happens on the metric reader's
thread. A failure to record is logged, never raised into the run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from typing import Any, Mapping

from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode

from agentd.server.tenancy import DEFAULT_TENANT

log = logging.getLogger("agentd.tracing")

# GenAI semantic conventions' recommended boundaries.
OPERATION_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_USAGE_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)
# A run spans several model calls and tools: from sub-second to many minutes.
RUN_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
# From the run's start to its first model token: history, guardrails and the model's first byte.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
# Tools range from in-process lookups (ms) to slow APIs up to their timeout.
TOOL_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

OTHER = "_OTHER"

# Queued spans are recorded this long after the first of them ended, this many per callback
# (32 spans are ~0.5 ms of the loop's time; the rest follow in later callbacks, runs' work between).
RECORD_DELAY_S = 0.05
RECORD_BATCH = 32
# Beyond this many queued spans (a loop too busy to run the recording callback), on_end records at once.
MAX_QUEUED = 20_000
_TOOL_SPAN_PREFIX = "execute_tool "

# error.type classes, from the messages run_loop.py, tools.py and the model providers end spans with.
_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")
# With trace content off the span keeps only "Error: tool 'x' failed: ValueError" (no message).
_TOOL_EXCEPTION = re.compile(r"^Error: tool '[^']*' failed: ([A-Za-z_][\w.]*)(?::|$)")
_IDENTIFIER = re.compile(r"^[A-Za-z_][\w.]{0,63}$")


def _model_error_type(description: str, span_error_type: object) -> str:
    if match := _HTTP_STATUS.search(description):
        return match.group(1)
    if description.startswith("CancelledError"):
        return "cancelled"
    if " timed out " in description:
        return "timeout"
    if " is unreachable " in description:
        return "unreachable"
    if " refused to answer" in description:
        return "refusal"
    if description == "no response":
        return "no_response"
    # "<ExceptionClass>: message" from an unexpected exception
    if isinstance(span_error_type, str) and _IDENTIFIER.match(span_error_type):
        return span_error_type
    return OTHER


def _tool_error_type(description: str) -> str:
    if description.startswith("cancelled"):
        return "cancelled"
    if match := _TOOL_EXCEPTION.match(description):
        return match.group(1)
    if description.startswith("Error: tool '") and " timed out after " in description:
        return "timeout"
    if description.startswith(("Error: invalid arguments for tool", "Error: the arguments for tool")):
        return "invalid_arguments"
    if description.startswith("Error: there is no tool named"):
        return "unknown_tool"
    return OTHER


def _seconds(span: ReadableSpan) -> float:
    if span.start_time is None or span.end_time is None:
        return 0.0
    return max(0, span.end_time - span.start_time) / 1e9


class MetricsSpanProcessor(SpanProcessor):
    """Records run, model-call and tool metrics from agentd's ended spans.

    It does not own ``meter_provider``: whoever built it flushes and shuts it down.
    """

    def __init__(self, meter_provider: MeterProvider) -> None:
        meter = meter_provider.get_meter("agentd")
        self._runs = meter.create_counter("agentd.runs", unit="{run}", description="Runs finished, by outcome.")
        self._run_duration = meter.create_histogram(
            "agentd.run.duration",
            unit="s",
            description="Duration of agent runs, handoffs and tools included.",
            explicit_bucket_boundaries_advisory=RUN_DURATION_BUCKETS,
        )
        self._run_ttft = meter.create_histogram(
            "agentd.run.time_to_first_token",
            unit="s",
            description="Time from the start of a run to the first token of its first model answer.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self._operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=OPERATION_DURATION_BUCKETS,
        )
        self._token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_USAGE_BUCKETS,
        )
        self._model_cost = meter.create_counter(
            "agentd.model.cost", unit="USD", description="Cost of the priced model calls, from the price table."
        )
        self._unpriced_calls = meter.create_counter(
            "agentd.model.unpriced_calls", unit="{call}",
            description="Model calls of models the price table does not price (their cost is unknown).",
        )
        self._tool_duration = meter.create_histogram(
            "agentd.tool.duration",
            unit="s",
            description="Duration of function tool calls.",
            explicit_bucket_boundaries_advisory=TOOL_DURATION_BUCKETS,
        )
        self._tool_errors = meter.create_counter(
            "agentd.tool.errors", unit="{error}", description="Function tool calls that failed (cancellations excluded)."
        )
        self._guardrail_checks = meter.create_counter(
            "agentd.guardrail.checks", unit="{check}", description="Guardrail checks, by guardrail, stage and verdict."
        )
        self._failed_once = False
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._scheduled_on: asyncio.AbstractEventLoop | None = None  # the loop a recording callback waits on
        # Collections record the queue first: the SDK calls an observable instrument's callbacks
        # before it reads the synchronous instruments. This one observes nothing, so it is never
        # exported; it is only that hook.
        meter.create_observable_gauge(
            "agentd.metrics.queued_spans", callbacks=[self._before_collect], description="(not exported)"
        )

    def on_end(self, span: ReadableSpan) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or len(self._queue) >= MAX_QUEUED:
            self._record(span)
            return
        self._queue.append(span)
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_later(RECORD_DELAY_S, self._record_batch, loop)

    def _record_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled_on = None
        self.record_queued(RECORD_BATCH)
        if self._queue and self._scheduled_on is None:
            self._scheduled_on = loop
            loop.call_soon(self._record_batch, loop)

    def record_queued(self, limit: int | None = None) -> None:
        """Record the queued spans (at most ``limit``), oldest first; safe from any thread."""
        queue = self._queue
        count = 0
        while limit is None or count < limit:
            try:
                span = queue.popleft()
            except IndexError:
                return
            self._record(span)
            count += 1

    def _before_collect(self, options: Any) -> list[Any]:
        self.record_queued()
        return []

    def _record(self, span: ReadableSpan) -> None:
        attributes = span.attributes
        if not attributes:
            return
        kind = attributes.get("agentd.span_kind")
        try:
            if kind == "generation":
                self._generation(span, attributes)
            elif kind == "function":
                self._function(span)
            elif kind == "run":
                self._run(span, attributes)
            elif kind == "guardrail":
                self._guardrail(span, attributes)
        except Exception:  # noqa: BLE001 (span.end() must never raise into the run loop)
            if not self._failed_once:
                self._failed_once = True
                log.exception("could not record metrics for span %r; further failures are not logged", span.name)

    def _run(self, span: ReadableSpan, attributes: Mapping[str, Any]) -> None:
        status = span.status
        if status.status_code is StatusCode.ERROR:
            outcome = "cancelled" if (status.description or "").startswith("cancelled") else "failed"
        else:
            outcome = "completed"
        labels = {
            "gen_ai.agent.name": attributes.get("gen_ai.agent.name", ""),
            "agentd.agent.version": attributes.get("agentd.agent.version", 0),
            "agentd.run.status": outcome,
            "agentd.tenant": attributes.get("agentd.tenant", DEFAULT_TENANT),
        }
        self._runs.add(1, labels)
        self._run_duration.record(_seconds(span), labels)
        ttft_ms = attributes.get("agentd.ttft_ms")
        if isinstance(ttft_ms, (int, float)) and not isinstance(ttft_ms, bool) and ttft_ms >= 0:
            self._run_ttft.record(ttft_ms / 1000, labels)

    def _generation(self, span: ReadableSpan, attributes: Mapping[str, Any]) -> None:
        model = attributes.get("gen_ai.request.model", "")
        labels = {"gen_ai.operation.name": "chat", "gen_ai.request.model": model}
        if span.status.status_code is StatusCode.ERROR:
            error_type = _model_error_type(span.status.description or "", attributes.get("error.type"))
            self._operation_duration.record(_seconds(span), {**labels, "error.type": error_type})
            return
        self._operation_duration.record(_seconds(span), labels)
        input_tokens = attributes.get("gen_ai.usage.input_tokens")
        if input_tokens is not None:
            self._token_usage.record(input_tokens, {**labels, "gen_ai.token.type": "input"})
        output_tokens = attributes.get("gen_ai.usage.output_tokens")
        if output_tokens is not None:
            self._token_usage.record(output_tokens, {**labels, "gen_ai.token.type": "output"})
        if attributes.get("agentd.purpose") == "guardrail":
            return  # a classifier's call: priced after its span ended, in its run's cost only
        cost_labels = {
            "gen_ai.agent.name": attributes.get("gen_ai.agent.name", ""),
            "gen_ai.request.model": model,
            "agentd.tenant": attributes.get("agentd.tenant", DEFAULT_TENANT),
        }
        cost = attributes.get("agentd.cost_usd")
        if isinstance(cost, (int, float)) and not isinstance(cost, bool):
            self._model_cost.add(float(cost), cost_labels)
        else:
            self._unpriced_calls.add(1, cost_labels)

    def _function(self, span: ReadableSpan) -> None:
        name = span.name
        tool = name[len(_TOOL_SPAN_PREFIX):] if name.startswith(_TOOL_SPAN_PREFIX) else name
        if span.status.status_code is not StatusCode.ERROR:
            self._tool_duration.record(_seconds(span), {"gen_ai.tool.name": tool})
            return
        error_type = _tool_error_type(span.status.description or "")
        if error_type == "unknown_tool":
            tool = OTHER  # the name came from the model, not the app: unbounded
        labels = {"gen_ai.tool.name": tool, "error.type": error_type}
        self._tool_duration.record(_seconds(span), labels)
        if error_type != "cancelled":
            self._tool_errors.add(1, labels)

    def _guardrail(self, span: ReadableSpan, attributes: Mapping[str, Any]) -> None:
        labels: dict[str, Any] = {
            "agentd.guardrail.name": attributes.get("agentd.guardrail.name", OTHER),
            "agentd.guardrail.stage": attributes.get("agentd.guardrail.stage", OTHER),
            "agentd.guardrail.tripped": bool(attributes.get("agentd.guardrail.tripwire", False)),
        }
        if span.status.status_code is StatusCode.ERROR:
            labels["error.type"] = _model_error_type(span.status.description or "", attributes.get("error.type"))
        self._guardrail_checks.add(1, labels)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.record_queued()  # the meter provider's reader exports them
        return True

    def shutdown(self) -> None:
        self.record_queued()


class CacheMetrics:
    """``agentd.cache.lookups``: result cache lookups (``runs/cached.py``), by the agent the run
    started with (``gen_ai.agent.name``) and ``agentd.cache.result``: ``hit`` (answered from the
    cache) or ``miss`` (the run executed; a lookup that failed or timed out counts as a miss).
    Only runs of agents that opt in are looked up. Not derived from spans (a hit records no
    trace): recorded as the lookup answers, on the same meter provider as the span metrics.
    """

    def __init__(self, meter_provider: MeterProvider) -> None:
        self._lookups = meter_provider.get_meter("agentd").create_counter(
            "agentd.cache.lookups", unit="{lookup}", description="Result cache lookups, by agent and result."
        )

    def lookup(self, agent: str, hit: bool) -> None:
        try:
            self._lookups.add(1, {"gen_ai.agent.name": agent, "agentd.cache.result": "hit" if hit else "miss"})
        except Exception:  # noqa: BLE001 (never raised into a run)
            log.debug("could not record a result cache lookup", exc_info=True)
