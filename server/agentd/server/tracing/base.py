"""The tracing interface the agent loop records through.

The loop opens one trace per run and spans for agent segments, model calls, tool calls,
handoffs and guardrail checks. Recorders decide where they go (the in-process store; OpenTelemetry and
OTLP on top of it); the loop never knows. Recording must be cheap and must never raise
into the run.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from agentd.server.tenancy import DEFAULT_TENANT


# Attributes holding conversation content (tool arguments and results): recorded only when
# the operator allows it (AGENTD_TRACE_CONTENT), since they may carry personal data.
CONTENT_ATTRIBUTES = frozenset({"arguments", "output"})

# The attribute naming the tool on every tool span (SpanKind.FUNCTION): the tool the model
# called, as it called it. Recorders add it themselves (``kind_attributes``), so no caller
# opening a tool span can leave it out; trace_service.proto's Span.attributes lists it.
TOOL_NAME = "tool_name"

# On a tool span of a tool an MCP server serves (agentd.server.mcp): the server's name, and
# the tool's name on the server when the agent offers it under another (a prefixed name).
MCP_SERVER = "mcp_server"
MCP_TOOL = "mcp_tool"


def parse_traceparent(header: str) -> tuple[str, str] | None:
    """(trace id, parent span id) of a W3C ``traceparent``; None when absent or malformed."""
    parts = header.strip().lower().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    trace_id, span_id = parts[1], parts[2]
    if len(trace_id) != 32 or len(span_id) != 16 or not _is_hex(trace_id + span_id + parts[3]):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class SpanKind(enum.Enum):
    RUN = "run"
    AGENT = "agent"
    GENERATION = "generation"
    FUNCTION = "function"
    HANDOFF = "handoff"
    GUARDRAIL = "guardrail"  # one guardrail check (runtime.guardrails)


def kind_attributes(kind: SpanKind, name: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` plus those every span of ``kind`` carries: a tool span (named after its
    tool) gets ``tool_name``, unless the caller set it."""
    if kind is SpanKind.FUNCTION and TOOL_NAME not in attributes:
        return {TOOL_NAME: name, **attributes}
    return attributes


class SpanHandle(Protocol):
    span_id: str

    def set(self, **attributes: Any) -> None: ...

    def end(self, error: str = "", **attributes: Any) -> None: ...


class TraceHandle(Protocol):
    trace_id: str

    def span(self, kind: SpanKind, name: str, parent: SpanHandle | None, **attributes: Any) -> SpanHandle: ...

    def end(self, error: str = "") -> None: ...


class Tracer(Protocol):
    def start_trace(
        self,
        *,
        run_id: str,
        workflow_name: str,
        group_id: str,
        metadata: dict[str, str],
        agent: str,
        traceparent: str = "",
        tenant: str = DEFAULT_TENANT,
        agent_version: int = 0,
    ) -> TraceHandle:
        """``traceparent``: the caller's W3C trace context; the run's trace continues it.
        ``tenant``: the tenant owning the run (agentd.server.tenancy); only its callers see the trace.
        ``agent_version``: the version of the agent the run started with (``RunInput.agent_version``:
        0 for app-module and file agents); traces are listed by it."""
