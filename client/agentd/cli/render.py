"""Terminal rendering of runs, sessions and traces (rich)."""

from __future__ import annotations

import json
from typing import Callable, Iterable

from google.protobuf import json_format, timestamp_pb2
from rich.console import Console
from rich.text import Text

from agentd.cli.table import Bar, Cell, Column, FittedTable, Sparkline
from agentd.client._requests import python_value
from agentd.v1 import agent_service_pb2, item_pb2, run_event_pb2, session_service_pb2, stats_service_pb2, trace_service_pb2


def _arguments(call: item_pb2.ToolCall) -> str:
    if call.raw_arguments:
        return call.raw_arguments
    args = json_format.MessageToDict(call.arguments)
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _usage(usage: run_event_pb2.TokenUsage) -> str:
    reasoning = f" ({usage.reasoning_tokens} reasoning)" if usage.reasoning_tokens else ""
    return f"{usage.input_tokens} in / {usage.output_tokens} out tokens{reasoning}, {usage.requests} model call(s)"


class RunRenderer:
    """Prints a run as it happens: text as it streams, tools and handoffs on their own lines."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._in_text = False
        self.exit_code = 0

    def _end_text(self) -> None:
        if self._in_text:
            self.console.file.write("\n")
            self._in_text = False

    def line(self, text: Text | str) -> None:
        self._end_text()
        self.console.print(text, highlight=False)

    def event(self, event: run_event_pb2.RunEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "text_delta":
            if not self._in_text:
                self.console.print(Text(f"{event.text_delta.agent}: ", style="bold cyan"), end="")
                self._in_text = True
            self.console.file.write(event.text_delta.text)
            self.console.file.flush()
        elif kind == "run_started":
            started = event.run_started
            where = f" in {started.session} ({started.history_items} earlier items)" if started.session else ""
            self.line(Text(f"▶ run {event.run_id} · agent {started.agent}{where}", style="dim"))
        elif kind == "tool_called":
            call = event.tool_called.item.tool_call
            if call.tool_name.startswith("transfer_to_"):
                return
            self.line(Text(f"  → {call.tool_name}({_arguments(call)})", style="yellow"))
        elif kind == "tool_output":
            result = event.tool_output.item.tool_result
            if result.tool_name.startswith("transfer_to_"):
                return
            ms = event.tool_output.duration.ToMilliseconds()
            style = "red" if result.is_error else "green"
            self.line(Text(f"  ← {result.tool_name}: {_short(result.output)} ({ms} ms)", style=style))
        elif kind == "handoff":
            self.line(Text(f"  ⇢ handoff {event.handoff.from_agent} → {event.handoff.to_agent}", style="magenta"))
        elif kind == "run_completed":
            done = event.run_completed
            output = python_value(done.final_output)
            if not isinstance(output, str):
                self.line(Text(json.dumps(output, indent=2, ensure_ascii=False)))
            seconds = done.duration.ToTimedelta().total_seconds()
            self.line(Text(
                f"✔ completed by {done.last_agent} in {seconds:.3f}s · {done.turns} turn(s) · {_usage(done.usage)}",
                style="bold green",
            ))
        elif kind == "run_failed":
            failed = event.run_failed
            code = run_event_pb2.RunErrorCode.Name(failed.code).removeprefix("RUN_ERROR_CODE_")
            self.line(Text(f"✘ failed ({code}): {failed.message}", style="bold red"))
            self.exit_code = 1
        elif kind == "run_cancelled":
            self.line(Text(f"✘ cancelled: {event.run_cancelled.reason}", style="bold red"))
            self.exit_code = 130
        elif kind == "run_resumed":
            resumed = event.run_resumed
            self.line(Text(
                f"↻ resumed (attempt {resumed.attempt}, {resumed.turns} turn(s) kept): {resumed.reason}",
                style="bold yellow",
            ))
        elif kind == "history_compacted":
            compacted = event.history_compacted
            dropped = f", {compacted.dropped_items} dropped" if compacted.dropped_items else ""
            self.line(Text(
                f"  ≡ history compacted: {compacted.summarised_items} item(s) summarised, "
                f"{compacted.kept_items} kept{dropped}",
                style="dim",
            ))
        elif kind == "guardrail_tripped":
            tripped = event.guardrail_tripped
            stage = run_event_pb2.GuardrailStage.Name(tripped.stage).removeprefix("GUARDRAIL_STAGE_").lower()
            where = f" · {tripped.tool_name} call {tripped.call_id}" if tripped.tool_name else ""
            reason = f": {tripped.reason}" if tripped.reason else ""
            self.line(Text(f"  ⛔ guardrail {tripped.guardrail} tripped ({stage}{where}){reason}", style="bold red"))
        elif kind == "hosted_tool_call":
            hosted = event.hosted_tool_call
            details = json_format.MessageToDict(hosted.details)
            what = next((str(details[k]) for k in ("query", "url", "code", "revised_prompt") if details.get(k)), "")
            if not what and details.get("queries"):
                what = ", ".join(str(q) for q in details["queries"])
            found = ""
            if details.get("sources"):
                found = f" · {len(details['sources'])} source(s)"
            elif "result_count" in details:
                found = f" · {int(details['result_count'])} result(s)"
            elif details.get("logs"):
                found = f" · {_short(str(details['logs']), 80)}"
            status = "" if hosted.status == "completed" else f" [{hosted.status}]"
            style = "red" if hosted.status in ("failed", "incomplete") else "blue"
            self.line(Text(f"  ⌕ {hosted.tool}({_short(what, 120)}){found}{status}", style=style))
        elif kind == "action_required":
            required = event.action_required
            call = required.item.tool_call
            what = "approve" if required.action == run_event_pb2.REQUIRED_ACTION_APPROVAL else "send the output of"
            self.line(Text(
                f"  ⏸ waiting for the caller to {what} {call.tool_name}({_arguments(call)}) · call {call.call_id}",
                style="bold yellow",
            ))


def _item_text(item: item_pb2.Item) -> tuple[str, str]:
    kind = item.WhichOneof("content")
    if kind == "message":
        role = item_pb2.Role.Name(item.message.role).removeprefix("ROLE_").lower()
        return role, item.message.text
    if kind == "tool_call":
        return "tool call", f"{item.tool_call.tool_name}({_arguments(item.tool_call)})"
    if kind == "summary":
        return "summary", f"({item.summary.summarised_items} items) {item.summary.text}"
    if kind == "reasoning":
        return "reasoning", " ".join(item.reasoning.summary) or "(no summary)"
    return "tool result", f"{item.tool_result.tool_name}: {item.tool_result.output}"


def items_table(session: session_service_pb2.Session, items: Iterable[item_pb2.Item]) -> FittedTable:
    """A session's items; the content wraps at spaces in whatever width the other columns leave."""
    columns = [
        Column("#", priority=100, justify="right"),
        Column("kind", priority=90),
        Column("agent", priority=80, min_width=8),
        Column("content", priority=10, min_width=20, wrap=True),
    ]
    rows = []
    for item in items:
        kind, text = _item_text(item)
        rows.append([str(item.sequence), kind, item.agent, _short(text, 400)])
    return FittedTable(columns, rows, title=[f"{session.name} ·", f"{session.item_count} item(s)"])


def sessions_table(sessions: Iterable[session_service_pb2.Session]) -> FittedTable:
    """Sessions; the name is the id the other commands take, so it is never cut."""
    columns = [
        Column("name", priority=100),
        Column("items", priority=90, justify="right"),
        Column("updated", priority=50, optional=True),
        Column("metadata", priority=10, min_width=10, optional=True),
    ]
    rows = []
    for session in sessions:
        updated = session.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        metadata = ", ".join(f"{k}={v}" for k, v in session.metadata.items())
        rows.append([session.name, str(session.item_count), updated, metadata])
    return FittedTable(columns, rows, title="sessions")


def runs_table(runs: Iterable[agent_service_pb2.RunInfo]) -> FittedTable:
    """Runs; the run id is never cut, the result wraps at spaces, the bookkeeping columns go first."""
    columns = [
        Column("run", priority=100),
        Column("status", priority=95),
        Column("agent", priority=90, min_width=8),
        Column("replica", priority=20, min_width=8, optional=True),
        Column("attempt", priority=30, optional=True, justify="right"),
        Column("events", priority=40, optional=True, justify="right"),
        Column("created", priority=50, optional=True),
        Column("result", priority=80, min_width=12, wrap=True),
    ]
    rows = []
    for run in runs:
        status = agent_service_pb2.RunStatus.Name(run.status).removeprefix("RUN_STATUS_").lower()
        created = run.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        rows.append([run.name, status, run.agent.removeprefix("agents/"), run.replica, str(run.attempt),
                     str(run.last_sequence), created, _run_result(run)])
    return FittedTable(columns, rows, title="runs")


def _run_result(run: agent_service_pb2.RunInfo) -> str:
    kind = run.WhichOneof("result")
    if kind == "completed":
        output = python_value(run.completed.final_output)
        return _short(output if isinstance(output, str) else json.dumps(output, ensure_ascii=False), 80)
    if kind == "failed":
        return run_event_pb2.RunErrorCode.Name(run.failed.code).removeprefix("RUN_ERROR_CODE_") + ": " + run.failed.message
    if kind == "cancelled":
        return "cancelled: " + run.cancelled.reason
    waiting = [f"{'approve' if a.action == run_event_pb2.REQUIRED_ACTION_APPROVAL else 'output'} "
               f"{a.item.tool_call.tool_name} ({a.item.tool_call.call_id})" for a in run.required_actions]
    return "waits for: " + ", ".join(waiting) if waiting else ""


def _status(status: int) -> str:
    return trace_service_pb2.SpanStatus.Name(status).removeprefix("SPAN_STATUS_").lower()


def _clock(timestamp: timestamp_pb2.Timestamp) -> str:
    return timestamp.ToDatetime().strftime("%H:%M:%S.%f")[:-3]


def _duration(ns: int) -> str:
    ms = ns / 1e6
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def traces_table(traces: Iterable[trace_service_pb2.Trace]) -> FittedTable:
    """Traces, newest first. The trace id is what `traces show` takes, so it is never cut; at 80
    columns the id, agents, status and start time stay and the tokens, version, workflow, span count
    and group go. ``version`` is the starting agent's (0: an app-module or file agent)."""
    columns = [
        Column("trace", priority=100),
        Column("workflow", priority=40, min_width=8, optional=True),
        Column("group", priority=10, min_width=6, optional=True),
        Column("agents", priority=80, min_width=12),
        Column("version", priority=50, optional=True, justify="right"),
        Column("status", priority=90),
        Column("started", priority=75, optional=True),
        Column("spans", priority=20, optional=True, justify="right"),
        Column("tokens in/out", priority=70, optional=True, justify="right"),
    ]
    rows = []
    for trace in traces:
        agents = " → ".join(trace.agents) or trace.agent
        started = f"{trace.start_time.ToDatetime():%H:%M:%S}"
        rows.append([trace.trace_id, trace.workflow_name, trace.group_id, agents, str(trace.agent_version),
                     _status(trace.status), started, str(trace.span_count),
                     f"{trace.input_tokens}/{trace.output_tokens}"])
    return FittedTable(columns, rows, title="traces")


def _kind(span: trace_service_pb2.Span) -> str:
    return trace_service_pb2.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_").lower()


def _span_label(span: trace_service_pb2.Span, attrs: dict[str, object], agent: str) -> str:
    """The span's kind and what it is about: the model of a generation, the target of a handoff, the
    tool of a function call. A name that only repeats the agent column is left out."""
    kind = _kind(span)
    if span.kind == trace_service_pb2.SPAN_KIND_HANDOFF and attrs.get("to_agent"):
        return f"{kind} → {attrs['to_agent']}"
    detail = str(attrs.get("model") or span.name) if span.kind == trace_service_pb2.SPAN_KIND_GENERATION else span.name
    return kind if detail in ("", agent) else f"{kind} {detail}"


def _axis(total: str) -> Callable[[int], str]:
    """The waterfall's header: the run's start on the left, its length on the right."""
    return lambda width: f"0{total:>{width - 1}}" if width > len(total) + 1 else total


def trace_timeline(response: trace_service_pb2.GetTraceResponse) -> FittedTable:
    """A trace as a waterfall, as Jaeger draws one: a row per span, indented under its parent, with a
    bar placed by the span's start and sized by its duration against the whole run. A failed span is
    marked ✘ and its message printed in full under the table: in a cell it would fill a column."""
    trace = response.trace
    begin = trace.start_time.ToNanoseconds()
    ends = [trace.end_time.ToNanoseconds()] if trace.HasField("end_time") else []
    for span in response.spans:
        ends.append(span.end_time.ToNanoseconds() if span.HasField("end_time") else span.start_time.ToNanoseconds())
    total = max(max(ends, default=begin) - begin, 1)
    columns = [
        Column("time", priority=30, optional=True),
        Column("span", priority=85, min_width=14),
        Column("agent", priority=90, min_width=8),
        Column("tokens in/out", priority=95, justify="right"),
        Column("duration", priority=100, justify="right"),
        Column(_axis(_duration(total)), priority=20, min_width=12, natural=100),
    ]
    depth: dict[str, int] = {}
    rows: list[list[Cell]] = []
    notes: list[Text] = []
    for span in response.spans:
        level = depth.get(span.parent_span_id, -1) + 1
        depth[span.span_id] = level
        attrs = json_format.MessageToDict(span.attributes)
        agent = str(attrs.get("agent", attrs.get("from_agent", "")))
        tokens = f"{int(attrs['input_tokens'])}/{int(attrs.get('output_tokens', 0))}" if "input_tokens" in attrs else ""
        start = span.start_time.ToNanoseconds() - begin
        if span.HasField("end_time"):
            end = span.end_time.ToNanoseconds() - begin
            took, bar = _duration(end - start), Bar(start / total, end / total, "red" if span.error_message else "cyan")
        else:  # still going: drawn to the trace's latest point, lighter
            took, bar = "…", Bar(start / total, 1.0, "yellow", char="░")
        label = _span_label(span, attrs, agent)
        if span.error_message:
            label += " ✘"
            notes.append(Text(f"✘ {_kind(span)} {span.name}: {_short(span.error_message, 1000)}", style="red"))
        rows.append([_clock(span.start_time), "  " * level + label, agent, tokens, took, bar])
    about = [trace.workflow_name, f"run {trace.run_id}" if trace.run_id else "", _duration(total)]
    title = [f"trace {trace.trace_id}", *(f"· {phrase}" for phrase in about if phrase)]
    return FittedTable(columns, rows, title=title, notes=notes)


# --- stats ---------------------------------------------------------------------------------

# The widest trend drawn: a window of more buckets adds neighbours up (see ``Sparkline``).
MAX_TREND_WIDTH = 48
_BUCKET_SECONDS = {
    stats_service_pb2.TIME_BUCKET_MINUTE: 60,
    stats_service_pb2.TIME_BUCKET_HOUR: 3600,
    stats_service_pb2.TIME_BUCKET_DAY: 86400,
}


def bucket_name(bucket: int) -> str:
    return stats_service_pb2.TimeBucket.Name(bucket).removeprefix("TIME_BUCKET_").lower()


def _group_name(group: stats_service_pb2.AgentStats) -> str:
    agent = group.agent.removeprefix("agents/")
    return f"{agent} v{group.agent_version}" if group.HasField("agent_version") else agent


def _percentile(percentiles: stats_service_pb2.DurationPercentiles, which: str) -> str:
    """A percentile as ``_duration`` writes durations; "–" when there was nothing to rank."""
    return _duration(getattr(percentiles, which).ToNanoseconds()) if percentiles.count else "–"


def _tokens(count: int) -> str:
    """1234 → 1.2k, 1234567 → 1.2M."""
    if count < 1000:
        return str(count)
    if count < 1_000_000:
        return f"{count / 1000:.1f}k"
    return f"{count / 1_000_000:.1f}M"


def usd(money) -> str:  # google.type.Money
    """Dollars to the cent from a dollar up, else to a hundredth of a cent ($0.0042)."""
    from decimal import Decimal

    amount = Decimal(money.units) + Decimal(money.nanos) / Decimal(1_000_000_000)
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


def _percent(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def error_code_name(code: int) -> str:
    """``model_error`` for RUN_ERROR_CODE_MODEL_ERROR; ``unknown`` for a failure without a code."""
    name = run_event_pb2.RunErrorCode.Name(code).removeprefix("RUN_ERROR_CODE_").lower()
    return "unknown" if name == "unspecified" else name


def _top_errors(stats: stats_service_pb2.RunStats, count: int = 3) -> str:
    """The most frequent error codes (the server sends them most first): ``model_error 12, …``."""
    shown = [f"{error_code_name(e.code)} {e.runs}" for e in stats.errors[:count]]
    if len(stats.errors) > count:
        shown.append(f"+{len(stats.errors) - count} more")
    return ", ".join(shown)


def runs_per_bucket(response: stats_service_pb2.GetStatsResponse, group: stats_service_pb2.AgentStats) -> list[int]:
    """The group's runs in every bucket of the window, oldest first (0 where the series has no entry)."""
    width = _BUCKET_SECONDS[response.bucket]
    first = response.start_time.seconds // width
    last = (response.end_time.ToNanoseconds() - 1) // 1_000_000_000 // width
    counts = [0] * max(last - first + 1, 0)
    for bucket in group.buckets:
        index = bucket.start_time.seconds // width - first
        if 0 <= index < len(counts):
            counts[index] += bucket.stats.runs
    return counts


def stats_table(response: stats_service_pb2.GetStatsResponse) -> FittedTable:
    """One row per agent (or agent version): runs, success rate, duration p50/p95, time to first
    token p50, tokens in/out, cost, its most frequent error codes and its trend (a sparkline of runs
    per bucket over the whole window). The agent, its counts, latencies and trend never go; at 80
    columns the tokens, unpriced count and errors go first. The trend draws a character per bucket
    up to ``MAX_TREND_WIDTH`` (more buckets are added up, a run of neighbours per character), and
    at least 8."""
    by_version = any(g.HasField("agent_version") for g in response.groups)
    trends = [runs_per_bucket(response, group) for group in response.groups]
    columns = [
        Column("agent", priority=100),
        Column("runs", priority=99, justify="right"),
        Column("success", priority=98, justify="right"),
        Column("p50", priority=90, justify="right"),
        Column("p95", priority=85, justify="right"),
        Column("ttft p50", priority=70, optional=True, justify="right"),
        Column("tokens in/out", priority=45, optional=True, justify="right"),
        Column("cost", priority=60, optional=True, justify="right"),
        Column("unpriced", priority=20, optional=True, justify="right"),
        Column("top errors", priority=40, min_width=12, optional=True),
        Column("trend", priority=50, min_width=8, natural=min(max(map(len, trends), default=0), MAX_TREND_WIDTH)),
    ]
    rows: list[list[Cell]] = []
    for group, trend in zip(response.groups, trends):
        totals = group.totals
        rows.append([
            _group_name(group), str(totals.runs), _percent(totals.success_rate),
            _percentile(totals.duration, "p50"), _percentile(totals.duration, "p95"),
            _percentile(totals.time_to_first_token, "p50"),
            f"{_tokens(totals.input_tokens)}/{_tokens(totals.output_tokens)}", usd(totals.cost),
            str(totals.unpriced_runs) if totals.unpriced_runs else "", _top_errors(totals),
            Sparkline(tuple(trend), style="cyan"),
        ])
    start = response.start_time.ToDatetime()
    end = response.end_time.ToDatetime()
    total = sum(group.totals.runs for group in response.groups)
    title = ["agents" if not by_version else "agent versions",
             f"· {start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC", f"· {total} run(s)",
             f"· trend: runs per {bucket_name(response.bucket)}"]
    return FittedTable(columns, rows, title=title)


def tool_stats_table(response: stats_service_pb2.GetStatsResponse) -> FittedTable:
    """One row per tool of each agent (or version), most called first: calls, errors, error rate
    and call duration p50/p95. The names and counts never go; the durations go first."""
    columns = [
        Column("agent", priority=100),
        Column("tool", priority=99),
        Column("calls", priority=98, justify="right"),
        Column("errors", priority=97, justify="right"),
        Column("error rate", priority=96, justify="right"),
        Column("p50", priority=50, optional=True, justify="right"),
        Column("p95", priority=40, optional=True, justify="right"),
    ]
    rows: list[list[Cell]] = []
    notes: list[Text] = []
    for group in response.groups:
        for tool in group.tools:
            rows.append([_group_name(group), tool.tool, str(tool.calls), str(tool.errors), _percent(tool.error_rate),
                         _percentile(tool.duration, "p50"), _percentile(tool.duration, "p95")])
        if group.omitted_tools:
            notes.append(Text(f"{_group_name(group)}: {group.omitted_tools} more tool(s) not listed", style="dim"))
    return FittedTable(columns, rows, title="tools", notes=notes)
