"""Terminal rendering of runs, sessions and traces (rich)."""

from __future__ import annotations

import json
from typing import Iterable

from google.protobuf import json_format
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agentd.client._requests import python_value
from agentd.v1 import agent_service_pb2, item_pb2, run_event_pb2, session_service_pb2, trace_service_pb2


def _arguments(call: item_pb2.ToolCall) -> str:
    if call.raw_arguments:
        return call.raw_arguments
    args = json_format.MessageToDict(call.arguments)
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _usage(usage: run_event_pb2.TokenUsage) -> str:
    return f"{usage.input_tokens} in / {usage.output_tokens} out tokens, {usage.requests} model call(s)"


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
    return "tool result", f"{item.tool_result.tool_name}: {item.tool_result.output}"


def items_table(session: session_service_pb2.Session, items: Iterable[item_pb2.Item]) -> Table:
    table = Table(title=f"{session.name} · {session.item_count} item(s)", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("agent")
    table.add_column("kind")
    table.add_column("content", overflow="fold")
    for item in items:
        kind, text = _item_text(item)
        table.add_row(str(item.sequence), item.agent, kind, _short(text, 400))
    return table


def sessions_table(sessions: Iterable[session_service_pb2.Session]) -> Table:
    table = Table(title="sessions")
    for column in ("name", "items", "updated", "metadata"):
        table.add_column(column)
    for session in sessions:
        updated = session.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        metadata = ", ".join(f"{k}={v}" for k, v in session.metadata.items())
        table.add_row(session.name, str(session.item_count), updated, metadata)
    return table


def runs_table(runs: Iterable[agent_service_pb2.RunInfo]) -> Table:
    table = Table(title="runs")
    for column in ("run", "status", "agent", "replica", "attempt", "events", "created", "result"):
        table.add_column(column, overflow="fold")
    for run in runs:
        status = agent_service_pb2.RunStatus.Name(run.status).removeprefix("RUN_STATUS_").lower()
        created = run.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(run.name, status, run.agent.removeprefix("agents/"), run.replica, str(run.attempt),
                      str(run.last_sequence), created, _run_result(run))
    return table


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


def traces_table(traces: Iterable[trace_service_pb2.Trace]) -> Table:
    table = Table(title="traces")
    for column in ("trace", "workflow", "group", "agents", "status", "started", "spans", "tokens in/out"):
        table.add_column(column)
    for trace in traces:
        status = trace_service_pb2.SpanStatus.Name(trace.status).removeprefix("SPAN_STATUS_").lower()
        started = trace.start_time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
        agents = " → ".join(trace.agents) or trace.agent
        table.add_row(trace.trace_id, trace.workflow_name, trace.group_id, agents, status, started,
                      str(trace.span_count), f"{trace.input_tokens}/{trace.output_tokens}")
    return table


def trace_timeline(response: trace_service_pb2.GetTraceResponse) -> Table:
    trace = response.trace
    table = Table(title=f"trace {trace.trace_id} · {trace.workflow_name} · run {trace.run_id}")
    for column in ("time", "step", "agent", "name", "duration", "tokens in/out", "error"):
        table.add_column(column, overflow="fold")
    depth: dict[str, int] = {}
    for span in response.spans:
        level = depth.get(span.parent_span_id, -1) + 1
        depth[span.span_id] = level
        kind = trace_service_pb2.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_").lower()
        started = span.start_time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
        if span.HasField("end_time"):
            ms = (span.end_time.ToNanoseconds() - span.start_time.ToNanoseconds()) / 1e6
            took = f"{ms:.1f} ms"
        else:
            took = "…"
        attrs = json_format.MessageToDict(span.attributes)
        tokens = ""
        if "input_tokens" in attrs:
            tokens = f"{int(attrs['input_tokens'])}/{int(attrs.get('output_tokens', 0))}"
        agent = str(attrs.get("agent", attrs.get("from_agent", "")))
        table.add_row(started, "  " * level + kind, agent, span.name, took, tokens,
                      Text(_short(span.error_message, 80), style="red"))
    return table
