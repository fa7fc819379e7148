"""Typed run events, as the agent loop emits them.

The loop builds payloads; a ``RunEventSink`` stamps each with the run id, the next
sequence number and a timestamp. The gRPC edge translates them to ``agentd.v1.RunEvent``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Union

from agentd.server.runtime.items import MessageItem, SummaryItem, ToolCallItem, ToolResultItem
from agentd.server.runtime.usage import Usage


class RunErrorCode(enum.Enum):
    MAX_TURNS_EXCEEDED = "max_turns_exceeded"
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_ERROR = "model_error"
    INVALID_OUTPUT = "invalid_output"
    SESSION_UNAVAILABLE = "session_unavailable"
    INTERNAL = "internal"
    GUARDRAIL_TRIPPED = "guardrail_tripped"
    INVALID_CONTEXT = "invalid_context"


@dataclass(slots=True, frozen=True)
class RunStarted:
    agent: str
    session_id: str
    history_items: int  # session items sent to the model as history (the window)
    request_id: str
    # Older session items left out by the history window (see AgentRunner._read_window); 0: none.
    history_omitted: int = 0
    # The starting agent's version (0: an app-module or file agent).
    agent_version: int = 0
    # The run is answered from the result cache (runs/cached.py): no history read, no model call.
    cached: bool = False


@dataclass(slots=True, frozen=True)
class AgentUpdated:
    agent: str


@dataclass(slots=True, frozen=True)
class TextDelta:
    agent: str
    text: str


@dataclass(slots=True, frozen=True)
class MessageOutput:
    agent: str
    item: MessageItem


@dataclass(slots=True, frozen=True)
class ToolCalled:
    agent: str
    item: ToolCallItem


@dataclass(slots=True, frozen=True)
class ToolOutput:
    agent: str
    item: ToolResultItem
    duration_s: float


@dataclass(slots=True, frozen=True)
class Handoff:
    from_agent: str
    to_agent: str
    call_id: str


@dataclass(slots=True, frozen=True)
class UsageUpdated:
    """After a model call: the call's usage (``requests`` 1) and the run's so far.

    Each carries its cost (``Usage.cost_usd``: exact US dollars, ``Decimal | None``; None is
    unknown, never 0) and ``unpriced_calls``: the call's cost is None when the price table
    does not name its model, the run's is the sum over its priced calls."""

    agent: str
    model: str
    turn: Usage
    run: Usage

    @property
    def turn_cost_usd(self) -> Decimal | None:
        return self.turn.cost_usd

    @property
    def run_cost_usd(self) -> Decimal | None:
        return self.run.cost_usd


@dataclass(slots=True, frozen=True)
class RunCompleted:
    final_output: Any  # str, or a JSON-able dict for structured output
    last_agent: str
    usage: Usage
    turns: int
    duration_s: float
    # A result-cache hit (runs/cached.py): final output, last agent, usage and turns are those of
    # the run that produced the entry; duration_s is this run's own.
    cached: bool = False

    @property
    def cost_usd(self) -> Decimal | None:
        """The run's cost over its priced model calls (``usage.unpriced_calls`` others); None: unknown."""
        return self.usage.cost_usd


@dataclass(slots=True, frozen=True)
class RunFailed:
    code: RunErrorCode
    message: str
    usage: Usage
    turns: int

    @property
    def cost_usd(self) -> Decimal | None:
        """The run's cost over its priced model calls (``usage.unpriced_calls`` others); None: unknown."""
        return self.usage.cost_usd


@dataclass(slots=True, frozen=True)
class RunCancelled:
    reason: str
    usage: Usage
    turns: int

    @property
    def cost_usd(self) -> Decimal | None:
        """The run's cost over its priced model calls (``usage.unpriced_calls`` others); None: unknown."""
        return self.usage.cost_usd


@dataclass(slots=True, frozen=True)
class RunResumed:
    """Another execution took the run over from its last checkpoint (``turns`` completed turns)."""

    attempt: int
    reason: str
    turns: int


@dataclass(slots=True, frozen=True)
class ActionRequired:
    """The run waits for the caller on a tool call: ``kind`` is "tool_output" or "approval"."""

    kind: str
    agent: str
    item: ToolCallItem


@dataclass(slots=True, frozen=True)
class HistoryCompacted:
    """The run compacted its session's history before its first turn (``runtime.history``).

    ``summary`` is the stored summary item, ``summary_sequence`` its sequence in the
    session; ``summarised_items`` the items this compaction folded (an earlier summary
    counting as one), ``kept_items`` the newest items left verbatim, ``dropped_items`` the
    items deleted from the session (0 when the policy keeps the originals).
    """

    agent: str
    session_id: str
    summary: SummaryItem
    summary_sequence: int
    summarised_items: int
    kept_items: int
    dropped_items: int


@dataclass(slots=True, frozen=True)
class GuardrailTripped:
    """A guardrail's tripwire ended the run (``runtime.guardrails``); ``RunFailed`` follows.

    ``stage``: "input", "output", "tool_before" or "tool_after"; ``agent`` the agent whose
    input, output or tool call it checked; ``output`` what the guardrail found (JSON-able);
    ``tool_name`` and ``call_id`` name the call at the tool stages ("" otherwise).
    """

    guardrail: str
    stage: str
    agent: str
    reason: str
    output: dict[str, Any]
    tool_name: str = ""
    call_id: str = ""


@dataclass(slots=True, frozen=True)
class HostedToolCall:
    """The model provider ran a hosted tool for the agent's model (Responses API): emitted as
    the call finishes, during the model's turn.

    ``tool``: "web_search", "file_search", "code_interpreter" or "image_generation";
    ``call_id``: the provider's id of the call; ``status``: as the provider reports it
    ("completed", "failed"...); ``details``: a small JSON summary of what it did and found
    (``ModelHostedCall.details``). Not stored in the session: the model's answer after it
    carries what it found.
    """

    agent: str
    tool: str
    call_id: str
    status: str
    details: dict[str, Any]


Payload = Union[
    RunStarted,
    AgentUpdated,
    TextDelta,
    MessageOutput,
    ToolCalled,
    ToolOutput,
    Handoff,
    UsageUpdated,
    RunCompleted,
    RunFailed,
    RunCancelled,
    RunResumed,
    ActionRequired,
    HistoryCompacted,
    GuardrailTripped,
    HostedToolCall,
]

TERMINAL_PAYLOADS = (RunCompleted, RunFailed, RunCancelled)


@dataclass(slots=True, frozen=True)
class RunEvent:
    run_id: str
    sequence: int
    time_ns: int
    trace_id: str
    payload: Payload

    @property
    def is_terminal(self) -> bool:
        return isinstance(self.payload, TERMINAL_PAYLOADS)
