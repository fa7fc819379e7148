"""The tracing interface the agent loop records through.

The loop opens one trace per run and spans for agent segments, model calls, tool calls
and handoffs. Recorders decide where they go (in-process store today; OTLP later);
the loop never knows. Recording must be cheap and must never raise into the run.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol


class SpanKind(enum.Enum):
    RUN = "run"
    AGENT = "agent"
    GENERATION = "generation"
    FUNCTION = "function"
    HANDOFF = "handoff"


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
    ) -> TraceHandle: ...
