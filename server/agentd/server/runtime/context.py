"""What instructions and tools can see of the run they are part of."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentd.server.auth.principal import Principal
from agentd.server.runtime.usage import Usage
from agentd.server.tenancy import DEFAULT_TENANT


@dataclass(slots=True)
class RunContext:
    run_id: str
    agent_name: str
    session_id: str | None  # as the caller named it (without its tenant)
    # Free-form context the caller sent with the run (StartRun.context).
    context: dict[str, Any] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    # Who started the run (subject, tenant, scopes), so a tool can act on the caller's behalf
    # and enforce its own data rules; None when the server has no authentication.
    principal: Principal | None = None

    @property
    def tenant(self) -> str:
        return self.principal.tenant if self.principal is not None else DEFAULT_TENANT


@dataclass(slots=True)
class ToolContext(RunContext):
    """A run context for one tool call; ``call_id`` is stable, so tools can deduplicate side effects."""

    call_id: str = ""
    tool_name: str = ""
