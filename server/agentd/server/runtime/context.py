"""What instructions and tools can see of the run they are part of."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentd.server.runtime.usage import Usage


@dataclass(slots=True)
class RunContext:
    run_id: str
    agent_name: str
    session_id: str | None
    # Free-form context the caller sent with the run (StartRun.context).
    context: dict[str, Any] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)


@dataclass(slots=True)
class ToolContext(RunContext):
    """A run context for one tool call; ``call_id`` is stable, so tools can deduplicate side effects."""

    call_id: str = ""
    tool_name: str = ""
