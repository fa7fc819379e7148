"""A run's progress after a completed step: what another replica needs to resume it.

The loop takes a checkpoint after every completed step:

- after a model turn that asked for tools: ``pending`` holds that turn's message and
  tool calls, not executed yet. It is durable before any of those tools starts (on a
  store other replicas share). A resuming replica executes exactly those calls again,
  with the same call ids, so a tool can recognise a repeat, except the calls whose
  output the run's log already holds (``ToolOutput`` events after ``sequence``: their
  tools finished before the takeover), whose logged output it uses instead.
- after the tool results (and handoff) of a turn, *before* it appends that step to the
  session: ``step_items`` is what the step appends. A resuming replica first re-appends
  it under ``step_request_id`` — a no-op if the dead replica got that far, the missing
  write otherwise — so the session and the checkpoint always agree.

Input guardrails (``runtime.guardrails``) are decided before the first checkpoint: the
first turn waits for their verdict before anything of it is checkpointed (or its tools
start). So a checkpoint exists only for a run whose input passed them, and a run resumed
from one does not check its input again; a run taken over before its first checkpoint
starts over, its input guardrails with the model call that was in flight. Output
guardrails pass before the last step's checkpoint (``done``) is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentd.server.runtime.items import Item
from agentd.server.runtime.usage import Usage


@dataclass(slots=True, frozen=True)
class Checkpoint:
    agent: str  # the agent in charge for the next turn
    turns: int  # completed turns
    usage: Usage  # the run's usage so far, its cost included: a takeover resumes both
    history_items: int  # session items read as history before the run's input
    run_items: tuple[Item, ...]  # the run's input and every completed step, in order
    step_items: tuple[Item, ...]  # the items the checkpointed step appends to the session
    step_request_id: str  # the session append's request id for that step
    sequence: int  # the last event sequence covered by the checkpoint
    trace_id: str = ""  # the run's trace, continued by a resumed execution
    span_id: str = ""  # the run's root span, parent of a resumed execution's spans
    final_output: Any = None  # set on the last step: the run only has to be reported
    done: bool = False  # True when the step was the last (final_output is the result)
    pending: tuple[Item, ...] = ()  # the current turn's message and tool calls, whose tools have not finished
    unsaved: tuple[Item, ...] = ()  # run items not in the session yet (the input, until the first step is saved)
    awaiting: tuple[str, ...] = ()  # action keys the pending calls need from the caller (approvals, outputs)
