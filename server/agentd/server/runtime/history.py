"""What a run sends the model of its session: the history window and compaction.

A run reads a bounded window of its session's newest items (``AgentRunner._read_window``).
Two rules shape what it sends of them, both pure functions here so the run loop, a resumed
run and the tests apply the very same ones:

- ``window_start``: a window cut at an item count must not begin inside a step.
- ``history_view``: a session that was compacted holds ``SummaryItem``s; the newest one in
  the window stands for everything before the items it kept, so the model gets the summary
  first, then the kept items and everything after it.

Compaction (opt-in per agent, ``Agent.compaction``) summarises the older items of a long
history with one model call before the run's first turn. ``plan_compaction`` decides
whether and what to fold; ``transcript`` renders those items as the summariser's input.
The summary is appended at the end of the session (an append is the one write every store
does atomically and idempotently), with ``kept_items`` saying how many items just before
it it leaves out; the policy then keeps the originals (listable, never sent again) or drops
them (``SessionStore.drop_items_through``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from agentd.server.runtime.items import Item, MessageItem, ReasoningItem, SummaryItem, ToolCallItem, ToolResultItem

DEFAULT_COMPACTION_INSTRUCTIONS = (
    "You compact the history of a conversation between a user and an AI assistant so the "
    "assistant can continue it without the full history. Write a concise summary of the "
    "transcript you are given: the user's goals, preferences and constraints; facts "
    "established; decisions made; results of tool calls that still matter (names, ids, "
    "numbers); and questions still open. If the transcript starts with an earlier summary, "
    "fold it in. Write only the summary, in the language of the conversation."
)

# How many characters of one item the summariser's transcript quotes.
TRANSCRIPT_ITEM_CHARS = 4000


@dataclass(slots=True, frozen=True)
class Compaction:
    """An agent's compaction policy (``Agent.compaction``).

    Before a run's first turn, when the history it would send holds more than
    ``trigger_items`` items after its newest summary, the older items are summarised
    into one ``SummaryItem`` by a model call (``model``, else the agent's model, with
    ``instructions`` as its system prompt); the newest ``keep_items`` items (moved later
    so a step is never split) are kept verbatim. The run's events show it
    (``history_compacted``, with a ``usage_updated`` for the call's tokens).

    ``drop_originals``: False keeps the summarised items in the session (listable, never
    sent to a model again); True deletes every item older than the kept ones, including
    items beyond the history window that the summary could not read, so the session
    stays small.

    The trigger must be below the history window (the agent's ``history_limit`` or the
    server's ``AGENTD_HISTORY_MAX_ITEMS``), or compaction never happens.
    """

    trigger_items: int = 100
    keep_items: int = 20
    drop_originals: bool = False
    model: str | None = None
    instructions: str = DEFAULT_COMPACTION_INSTRUCTIONS

    def __post_init__(self) -> None:
        if self.trigger_items < 1:
            raise ValueError(f"compaction trigger_items must be >= 1, got {self.trigger_items}")
        if not 0 <= self.keep_items < self.trigger_items:
            raise ValueError(
                f"compaction keep_items must be >= 0 and below trigger_items ({self.trigger_items}), "
                f"got {self.keep_items}"
            )


@dataclass(slots=True, frozen=True)
class CompactionPlan:
    """What one compaction does: summarise ``fold`` (an earlier summary first, if any, then
    the oldest verbatim items) and keep the ``keep`` newest items verbatim."""

    fold: tuple[Item, ...]
    keep: int
    folded_items: int  # verbatim items folded (an earlier summary not counted)
    summarised_items: int  # every item the new summary stands for


def window_start(items: Sequence[Item]) -> int:
    """Where a cut history window may start: the index of its first item to send.

    Cutting a session at an item count can split a step: the window would then begin with
    tool results (or calls and results) whose calls were cut off, which a model refuses.
    Leading items are dropped until no tool result before the window's first user message
    lacks its call in the window: the window then starts at a user message or at a whole
    step. (Results after a user message belong to calls after it, so they are left alone.)
    """
    start = 0
    while True:
        calls: set[str] = set()
        orphan = -1
        for i in range(start, len(items)):
            item = items[i]
            if isinstance(item, MessageItem) and item.role == "user":
                break
            if isinstance(item, ToolCallItem):
                calls.add(item.call_id)
            elif isinstance(item, ToolResultItem) and item.call_id not in calls:
                orphan = i
        if orphan < 0:
            return start
        start = orphan + 1  # its siblings' results may be orphans now: look again


def history_view(window: Sequence[Item]) -> list[Item]:
    """The items a run sends for a session window: the newest summary first, then the items
    it kept and everything after it; the items it stands for are not sent again."""
    for s in range(len(window) - 1, -1, -1):
        summary = window[s]
        if isinstance(summary, SummaryItem):
            start = max(0, s - summary.kept_items)
            kept = [item for item in window[start:s] if not isinstance(item, SummaryItem)]
            return [summary, *kept, *window[s + 1 :]]
    return list(window)


def plan_compaction(view: Sequence[Item], policy: Compaction) -> CompactionPlan | None:
    """Whether ``view`` (a ``history_view``) needs compacting under ``policy``, and how."""
    earlier = view[0] if view and isinstance(view[0], SummaryItem) else None
    verbatim = view[1:] if earlier is not None else view
    if len(verbatim) <= policy.trigger_items:
        return None
    cut = len(verbatim) - policy.keep_items
    cut += window_start(verbatim[cut:])  # the kept items start at a user message or a whole step
    if cut <= 0:
        return None
    fold = (earlier, *verbatim[:cut]) if earlier is not None else tuple(verbatim[:cut])
    summarised = (earlier.summarised_items if earlier is not None else 0) + cut
    return CompactionPlan(fold, len(verbatim) - cut, cut, summarised)


def transcript(items: Sequence[Item]) -> str:
    """The summariser's input: one plain-text line block per item, each cut at
    ``TRANSCRIPT_ITEM_CHARS`` characters (a transcript, not a replay: tool calls need no
    tool definitions and any model can read it)."""
    lines: list[str] = []
    for item in items:
        if isinstance(item, SummaryItem):
            lines.append(f"[summary of the {item.summarised_items} earlier items]\n{_cut(item.text)}")
        elif isinstance(item, MessageItem):
            who = item.role if not item.agent or item.role != "assistant" else f"assistant ({item.agent})"
            lines.append(f"{who}: {_cut(item.text)}")
        elif isinstance(item, ToolCallItem):
            lines.append(f"tool call {item.tool_name} [{item.call_id}]: {_cut(item.arguments)}")
        elif isinstance(item, ReasoningItem):
            continue  # the model's own reasoning: the messages and calls after it say what came of it
        else:
            failed = " (error)" if item.is_error else ""
            lines.append(f"tool result {item.tool_name} [{item.call_id}]{failed}: {_cut(item.output)}")
    return "\n\n".join(lines)


def _cut(text: str) -> str:
    if len(text) <= TRANSCRIPT_ITEM_CHARS:
        return text
    return f"{text[:TRANSCRIPT_ITEM_CHARS]}… [{len(text) - TRANSCRIPT_ITEM_CHARS} more characters]"
