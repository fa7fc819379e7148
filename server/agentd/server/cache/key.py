"""Request keys: the SHA-256 of everything that makes two run requests the same.

``request_key`` hashes canonical JSON (keys sorted, no whitespace, ASCII escapes, no NaN)
of: the key format's version, the tenant, the starting agent's name and version, the
*agents' fingerprint*, the input text, the input items, the run's context and its
``max_turns`` override. Equal requests hash equal whatever order a context's keys came in;
anything else differs. Trace labels, request ids and the caller's subject are not part of it
(they do not change the answer; see ``runtime.agent.ResultCaching`` on callers).

The agents' fingerprint (``agents_fingerprint``) covers the definitions a run's answer can
depend on: the starting agent (the version the run pinned) and every agent it can reach by
handoffs (their current versions, as a handoff uses them), each described by what the
runtime agent holds: instructions (a template's text, or a function's qualified name), the
model and wire API it resolves to, model settings, tools (names, descriptions, schemas, who
executes them), handoffs, output schema, max_turns, hosted tools, MCP servers and guardrail
names. So a new version of an API agent, an edited agent file (whose version stays 0) or a
changed handoff target makes new keys: older entries are never served again. A change only
inside a Python function (an app-module tool's or instructions function's body) is not seen:
entries made before such a deploy are served until they expire.

Fingerprints are computed once per compiled agent (compiled agents are immutable; the catalog
makes a new one for a new version or file) and remembered for the newest
``FINGERPRINT_CACHE`` of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterable

from agentd.server.runtime.agent import CompiledAgent

__all__ = ["KEY_FORMAT", "agent_fingerprint", "agents_fingerprint", "canonical_json", "request_key"]

# Bumped when what goes into a key changes: entries of another format are never hit.
KEY_FORMAT = 1
FINGERPRINT_CACHE = 4096

_canonical: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), sort_keys=True, allow_nan=False
).encode


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON bytes: equal values (dict order aside) give equal bytes."""
    return _canonical(value).encode("ascii")


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def request_key(
    *,
    tenant: str,
    agent: str,
    version: int,
    fingerprint: str,
    input: str,
    input_items: Iterable[dict[str, Any]] = (),
    context: dict[str, Any] | None = None,
    max_turns: int | None = None,
) -> str:
    """The request's key: 64 lowercase hex digits. ``input_items`` as ``MessageItem.to_dict()``."""
    return _digest({
        "format": KEY_FORMAT,
        "tenant": tenant,
        "agent": agent,
        "version": version,
        "agents": fingerprint,
        "input": input,
        "input_items": list(input_items),
        "context": context or {},
        "max_turns": max_turns,
    })


def _callable_name(value: Any) -> str:
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"


def _instructions(value: Any) -> Any:
    if isinstance(value, str):
        return value
    template = getattr(value, "template", None)  # agents.build.TemplateInstructions
    if template is not None and hasattr(template, "pieces"):
        return {"template": [list(piece) for piece in template.pieces]}
    return {"function": _callable_name(value)}


def _jsonable(value: Any) -> Any:
    """Plain JSON of what a description holds (dataclasses as dicts, the rest by name)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return _callable_name(value)


def describe_agent(compiled: CompiledAgent) -> dict[str, Any]:
    """What the fingerprint of one agent covers (see the module docstring)."""
    agent = compiled.agent
    tools = [
        {
            "name": tool.name, "description": tool.description, "parameters": _jsonable(tool.parameters),
            "caller_executed": tool.caller_executed, "needs_approval": tool.needs_approval,
            "function": "" if tool.caller_executed else _callable_name(tool.fn),
        }
        for tool in agent.tools
    ]
    mcp = [
        {"name": getattr(server, "name", ""), "kind": type(server).__name__,
         "where": str(getattr(server, "url", "") or getattr(server, "command", ""))}
        for server in agent.mcp_servers
    ]
    return {
        "name": agent.name,
        "instructions": _instructions(agent.instructions),
        "model": compiled.model,
        "model_api": compiled.model_api,
        "model_settings": _jsonable(agent.model_settings),
        "tools": tools,
        "handoffs": agent.handoff_names,
        "output_schema": _jsonable(compiled.output_schema),
        "max_turns": agent.max_turns,
        "hosted_tools": _jsonable(list(compiled.hosted_tools)),
        "mcp_servers": mcp,
        "guardrails": {
            "input": [g.name for g in compiled.input_guardrails],
            "input_mode": agent.input_guardrail_mode,
            "output": [g.name for g in compiled.output_guardrails],
            "tool": [g.name for g in compiled.tool_guardrails],
        },
    }


_fingerprints: dict[int, tuple[CompiledAgent, str]] = {}


def agent_fingerprint(compiled: CompiledAgent) -> str:
    """One agent's fingerprint, remembered per compiled agent."""
    known = _fingerprints.get(id(compiled))
    if known is not None and known[0] is compiled:
        return known[1]
    fingerprint = _digest(describe_agent(compiled))
    if len(_fingerprints) >= FINGERPRINT_CACHE:
        _fingerprints.clear()  # rare (that many agent versions in use): recomputed as they come
    _fingerprints[id(compiled)] = (compiled, fingerprint)
    return fingerprint


def agents_fingerprint(agents: Iterable[CompiledAgent]) -> str:
    """The fingerprint of a set of agents (the starting one and those it can hand off to)."""
    return _digest(sorted([compiled.name, agent_fingerprint(compiled)] for compiled in agents))
