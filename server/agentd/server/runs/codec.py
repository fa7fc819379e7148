"""JSON for what the run stores keep: run specs, checkpoints and events.

Every engine stores the same shapes (UTF-8 JSON text), so a run written by a replica on
one engine version reads the same everywhere, and the stores never see protobuf.
Unknown event types raise ``ValueError`` rather than being guessed at.
"""

from __future__ import annotations

import json
from dataclasses import fields
from decimal import Decimal
from typing import Any

from agentd.server.auth.principal import Principal
from agentd.server.runtime import events as ev
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.runtime.run_loop import RunInput
from agentd.server.runtime.usage import Usage

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads


def _usage(u: Usage) -> list[Any]:
    """``[input, output, requests]``, ``+ [reasoning]`` when there are reasoning tokens, and
    ``[input, output, requests, reasoning, cached_input, unpriced_calls, cost]`` (cost: the exact
    US dollars as decimal text, or null) once there is a call or a cost: older readers read the
    first four entries and ignore the rest."""
    if u.requests or u.cached_input_tokens or u.unpriced_calls or u.cost_usd is not None:
        cost = None if u.cost_usd is None else str(u.cost_usd)
        return [u.input_tokens, u.output_tokens, u.requests, u.reasoning_tokens, u.cached_input_tokens,
                u.unpriced_calls, cost]
    if u.reasoning_tokens:
        return [u.input_tokens, u.output_tokens, u.requests, u.reasoning_tokens]
    return [u.input_tokens, u.output_tokens, u.requests]


def _usage_from(data: list[Any]) -> Usage:
    usage = Usage(int(data[0]), int(data[1]), int(data[2]), int(data[3]) if len(data) > 3 else 0)
    if len(data) >= 7:
        usage.cached_input_tokens = int(data[4])
        usage.unpriced_calls = int(data[5])
        usage.cost_usd = None if data[6] is None else Decimal(str(data[6]))
    else:
        # Written before costs were recorded (every call since is priced or counted unpriced): the
        # cost of those calls is unknown, never guessed, so they count as unpriced.
        usage.unpriced_calls = usage.requests
    return usage


def _items(items: tuple[Item, ...] | list[Item]) -> list[dict[str, Any]]:
    return [item.to_dict() for item in items]


def _items_from(data: list[dict[str, Any]]) -> tuple[Item, ...]:
    return tuple(item_from_dict(d) for d in data)


# -- run specs ------------------------------------------------------------------------------

def spec_to_dict(spec: RunInput) -> dict[str, Any]:
    data = {f.name: getattr(spec, f.name) for f in fields(RunInput)}
    data["principal"] = spec.principal.to_dict() if spec.principal is not None else None
    if spec.input_items:
        data["input_items"] = [item.to_dict() for item in spec.input_items]
    else:
        data.pop("input_items", None)
    return data


def spec_from_dict(data: dict[str, Any]) -> RunInput:
    known = {f.name for f in fields(RunInput)}
    values = {k: v for k, v in data.items() if k in known}
    principal = values.get("principal")
    values["principal"] = Principal.from_dict(principal) if isinstance(principal, dict) else None
    values["input_items"] = tuple(item_from_dict(item) for item in values.get("input_items") or ())
    return RunInput(**values)


def encode_spec(spec: RunInput) -> str:
    return _dumps(spec_to_dict(spec))


def decode_spec(text: str | bytes) -> RunInput:
    return spec_from_dict(_loads(text))


# -- checkpoints ----------------------------------------------------------------------------

def encode_checkpoint(cp: Checkpoint) -> str:
    return _dumps(
        {
            "agent": cp.agent,
            "turns": cp.turns,
            "usage": _usage(cp.usage),
            "history_items": cp.history_items,
            "run_items": _items(cp.run_items),
            "step_items": _items(cp.step_items),
            "step_request_id": cp.step_request_id,
            "sequence": cp.sequence,
            "trace_id": cp.trace_id,
            "span_id": cp.span_id,
            "final_output": cp.final_output,
            "done": cp.done,
            "pending": _items(cp.pending),
            "unsaved": _items(cp.unsaved),
            "awaiting": list(cp.awaiting),
        }
    )


def decode_checkpoint(text: str | bytes) -> Checkpoint:
    d = _loads(text)
    return Checkpoint(
        agent=d["agent"],
        turns=d["turns"],
        usage=_usage_from(d["usage"]),
        history_items=d["history_items"],
        run_items=_items_from(d["run_items"]),
        step_items=_items_from(d["step_items"]),
        step_request_id=d["step_request_id"],
        sequence=d["sequence"],
        trace_id=d.get("trace_id", ""),
        span_id=d.get("span_id", ""),
        final_output=d.get("final_output"),
        done=d.get("done", False),
        pending=_items_from(d.get("pending", [])),
        unsaved=_items_from(d.get("unsaved", [])),
        awaiting=tuple(d.get("awaiting", ())),
    )


# -- events ---------------------------------------------------------------------------------

def payload_to_dict(p: ev.Payload) -> dict[str, Any]:
    t = type(p)
    if t is ev.TextDelta:
        return {"t": "text_delta", "agent": p.agent, "text": p.text}
    if t is ev.MessageOutput:
        return {"t": "message_output", "agent": p.agent, "item": p.item.to_dict()}
    if t is ev.ToolCalled:
        return {"t": "tool_called", "agent": p.agent, "item": p.item.to_dict()}
    if t is ev.ToolOutput:
        return {"t": "tool_output", "agent": p.agent, "item": p.item.to_dict(), "duration_s": p.duration_s}
    if t is ev.UsageUpdated:
        return {"t": "usage_updated", "agent": p.agent, "model": p.model, "turn": _usage(p.turn), "run": _usage(p.run)}
    if t is ev.RunStarted:
        started = {
            "t": "run_started", "agent": p.agent, "session_id": p.session_id,
            "history_items": p.history_items, "request_id": p.request_id,
            "history_omitted": p.history_omitted, "agent_version": p.agent_version,
        }
        if p.cached:  # only when set: older readers ignore it, and the log stays as it was otherwise
            started["cached"] = True
        return started
    if t is ev.AgentUpdated:
        return {"t": "agent_updated", "agent": p.agent}
    if t is ev.Handoff:
        return {"t": "handoff", "from_agent": p.from_agent, "to_agent": p.to_agent, "call_id": p.call_id}
    if t is ev.RunCompleted:
        completed = {
            "t": "run_completed", "final_output": p.final_output, "last_agent": p.last_agent,
            "usage": _usage(p.usage), "turns": p.turns, "duration_s": p.duration_s,
        }
        if p.cached:
            completed["cached"] = True
        return completed
    if t is ev.RunFailed:
        return {"t": "run_failed", "code": p.code.value, "message": p.message, "usage": _usage(p.usage), "turns": p.turns}
    if t is ev.RunCancelled:
        return {"t": "run_cancelled", "reason": p.reason, "usage": _usage(p.usage), "turns": p.turns}
    if t is ev.RunResumed:
        return {"t": "run_resumed", "attempt": p.attempt, "reason": p.reason, "turns": p.turns}
    if t is ev.ActionRequired:
        return {"t": "action_required", "kind": p.kind, "agent": p.agent, "item": p.item.to_dict()}
    if t is ev.HistoryCompacted:
        return {
            "t": "history_compacted", "agent": p.agent, "session_id": p.session_id, "summary": p.summary.to_dict(),
            "summary_sequence": p.summary_sequence, "summarised_items": p.summarised_items,
            "kept_items": p.kept_items, "dropped_items": p.dropped_items,
        }
    if t is ev.GuardrailTripped:
        return {
            "t": "guardrail_tripped", "guardrail": p.guardrail, "stage": p.stage, "agent": p.agent,
            "reason": p.reason, "output": p.output, "tool_name": p.tool_name, "call_id": p.call_id,
        }
    if t is ev.HostedToolCall:
        return {
            "t": "hosted_tool_call", "agent": p.agent, "tool": p.tool, "call_id": p.call_id, "status": p.status,
            "details": p.details,
        }
    raise ValueError(f"cannot encode event payload {t.__name__}")


def payload_from_dict(d: dict[str, Any]) -> ev.Payload:
    t = d.get("t")
    if t == "text_delta":
        return ev.TextDelta(d["agent"], d["text"])
    if t == "message_output":
        return ev.MessageOutput(d["agent"], item_from_dict(d["item"]))  # type: ignore[arg-type]
    if t == "tool_called":
        return ev.ToolCalled(d["agent"], item_from_dict(d["item"]))  # type: ignore[arg-type]
    if t == "tool_output":
        return ev.ToolOutput(d["agent"], item_from_dict(d["item"]), d["duration_s"])  # type: ignore[arg-type]
    if t == "usage_updated":
        return ev.UsageUpdated(d["agent"], d["model"], _usage_from(d["turn"]), _usage_from(d["run"]))
    if t == "run_started":
        # Logs written before the history window have no "history_omitted": nothing was left out.
        return ev.RunStarted(d["agent"], d["session_id"], d["history_items"], d["request_id"],
                             d.get("history_omitted", 0), d.get("agent_version", 0), d.get("cached", False))
    if t == "agent_updated":
        return ev.AgentUpdated(d["agent"])
    if t == "handoff":
        return ev.Handoff(d["from_agent"], d["to_agent"], d["call_id"])
    if t == "run_completed":
        return ev.RunCompleted(d["final_output"], d["last_agent"], _usage_from(d["usage"]), d["turns"], d["duration_s"],
                               d.get("cached", False))
    if t == "run_failed":
        return ev.RunFailed(ev.RunErrorCode(d["code"]), d["message"], _usage_from(d["usage"]), d["turns"])
    if t == "run_cancelled":
        return ev.RunCancelled(d["reason"], _usage_from(d["usage"]), d["turns"])
    if t == "run_resumed":
        return ev.RunResumed(d["attempt"], d["reason"], d["turns"])
    if t == "action_required":
        return ev.ActionRequired(d["kind"], d["agent"], item_from_dict(d["item"]))  # type: ignore[arg-type]
    if t == "history_compacted":
        return ev.HistoryCompacted(
            d["agent"], d["session_id"], item_from_dict(d["summary"]),  # type: ignore[arg-type]
            d["summary_sequence"], d["summarised_items"], d["kept_items"], d["dropped_items"],
        )
    if t == "guardrail_tripped":
        return ev.GuardrailTripped(
            d["guardrail"], d["stage"], d["agent"], d["reason"], d.get("output") or {},
            d.get("tool_name", ""), d.get("call_id", ""),
        )
    if t == "hosted_tool_call":
        return ev.HostedToolCall(d["agent"], d["tool"], d["call_id"], d["status"], d.get("details") or {})
    raise ValueError(f"unknown event payload type {t!r}")


def encode_payload(p: ev.Payload) -> str:
    return _dumps(payload_to_dict(p))


def decode_payload(text: str | bytes) -> ev.Payload:
    return payload_from_dict(_loads(text))


def encode_event(e: ev.RunEvent) -> str:
    """One event as JSON text; the run id is not repeated (the log is per run)."""
    d = payload_to_dict(e.payload)
    d["seq"] = e.sequence
    d["ts"] = e.time_ns
    d["trace"] = e.trace_id
    return _dumps(d)


def decode_event(run_id: str, text: str | bytes) -> ev.RunEvent:
    d = _loads(text)
    return ev.RunEvent(run_id, d["seq"], d["ts"], d["trace"], payload_from_dict(d))


# -- caller actions -------------------------------------------------------------------------

def encode_action(action: dict[str, Any]) -> str:
    return _dumps(action)


def decode_action(text: str | bytes) -> dict[str, Any]:
    return _loads(text)
