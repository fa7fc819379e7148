"""Conversion between agentd items and the OpenAI Responses API's input and output items.

Pure functions, shared by the Responses model (which sends ``input`` and reads output
items) and the scripted OpenAI-compatible server (which reads ``input`` back to pick a
turn), so both agree on one shape, as ``chat_format`` does for Chat Completions.

Requests are stateless (``store=False``): the whole conversation goes in ``input`` every
turn. Reasoning items go back with their ``encrypted_content`` (the documented way to keep
a reasoning model's reasoning across turns without server-side state); one without it
cannot be replayed (its id would point at nothing stored) and is left out. Hosted tool
calls (web search...) are not replayed: the model's message after them carries what they
found, and the Responses API does not need them in ``input``. A reasoning item directly
followed by a hosted call is therefore not kept (``keep_reasoning``): replayed without the
item that followed it, the API would refuse it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from agentd.server.models.chat_format import summary_message
from agentd.server.runtime.items import (
    ImagePart,
    Item,
    MessageItem,
    ReasoningItem,
    SummaryItem,
    TextPart,
    ToolCallItem,
    ToolResultItem,
)

_TURN_ROLES = frozenset({"user", "assistant"})
# Output item types of hosted tool calls, by the hosted tool that makes them.
HOSTED_CALL_TYPES = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
}
# How much of a hosted call's action or result its details keep (a summary, not the result).
_MAX_DETAIL_CHARS = 500
_MAX_DETAIL_ITEMS = 10


def to_responses_input(items: Iterable[Item], *, reasoning: bool = True) -> list[dict[str, Any]]:
    """The ``input`` list of a Responses request for a conversation.

    ``reasoning=False`` leaves reasoning items out (a model that does not take them).
    """
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"type": "message", "role": item.role, "content": responses_content(item)})
        elif isinstance(item, ToolCallItem):
            out.append(
                {"type": "function_call", "call_id": item.call_id, "name": item.tool_name, "arguments": item.arguments}
            )
        elif isinstance(item, ToolResultItem):
            out.append({"type": "function_call_output", "call_id": item.call_id, "output": item.output})
        elif isinstance(item, SummaryItem):
            # Context, not a turn of the exchange: a system message, as on the chat path.
            out.append({"type": "message", "role": "system", "content": summary_message(item)})
        elif isinstance(item, ReasoningItem):
            if reasoning and item.encrypted_content and item.id:
                out.append(
                    {
                        "type": "reasoning",
                        "id": item.id,
                        "summary": [{"type": "summary_text", "text": part} for part in item.summary],
                        "encrypted_content": item.encrypted_content,
                    }
                )
    return out


def responses_content(item: MessageItem) -> str | list[dict[str, Any]]:
    """A message's ``content``: its text, or (with parts) ``input_text``/``input_image``/
    ``input_file`` parts (an assistant message's text parts as ``output_text``, which is what
    the API takes there; its images and files as text notes)."""
    if not item.parts:
        return item.text
    content: list[dict[str, Any]] = []
    if item.role == "assistant":
        for part in item.parts:
            text = part.text if isinstance(part, TextPart) else (
                f"[image: {part.url}]" if isinstance(part, ImagePart) else f"[file: {part.filename or part.file_id}]")
            content.append({"type": "output_text", "text": text})
        return content
    for part in item.parts:
        if isinstance(part, TextPart):
            content.append({"type": "input_text", "text": part.text})
        elif isinstance(part, ImagePart):
            content.append({"type": "input_image", "image_url": part.as_url(), "detail": part.detail or "auto"})
        else:
            file: dict[str, Any] = {"type": "input_file"}
            if part.file_id:
                file["file_id"] = part.file_id
            else:
                file["file_data"] = part.as_data_url()
                file["filename"] = part.filename
            content.append(file)
    return content


def responses_roles(input_items: Iterable[Mapping[str, Any]]) -> list[str]:
    """The "user"/"assistant"/"tool" markers ``count_assistant_turns`` expects, from ``input``.

    A reasoning item is part of the assistant turn it precedes; system and developer
    messages are skipped (not part of the exchange), as ``chat_roles`` skips them.
    """
    roles: list[str] = []
    for item in input_items:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role in _TURN_ROLES:
                roles.append(role)
        elif kind in ("function_call", "reasoning"):
            roles.append("assistant")
        elif kind == "function_call_output":
            roles.append("tool")
    return roles


def input_chars(input_items: Iterable[Mapping[str, Any]]) -> int:
    """Request size as ``ScriptedModel`` counts it: texts, call arguments and outputs
    (reasoning not counted, as on the chat path where it is not sent)."""
    total = 0
    for item in input_items:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(part.get("text", "")) for part in content if isinstance(part, Mapping))
        elif kind == "function_call":
            total += len(item.get("arguments") or "")
        elif kind == "function_call_output":
            output = item.get("output")
            total += len(output) if isinstance(output, str) else 0
    return total


def keep_reasoning(types: Sequence[str]) -> list[bool]:
    """For output items of these types, in order: whether each reasoning item is kept.

    A reasoning item is kept when the first item after it that is not reasoning is a message
    or a function call, which the session keeps too; not when it is a hosted call (not
    replayed) or nothing (the turn ended). Non-reasoning positions are False.
    """
    kept = [False] * len(types)
    follows_kept = False  # scanning backwards: whether the next non-reasoning item is kept
    for i in range(len(types) - 1, -1, -1):
        kind = types[i]
        if kind == "reasoning":
            kept[i] = follows_kept
        else:
            follows_kept = kind in ("message", "function_call")
    return kept


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS] + "…"


def hosted_call_details(item: Mapping[str, Any]) -> dict[str, Any]:
    """A small JSON summary of a hosted call output item: what it did and what it found.

    Never the whole result: no image data, no file contents; texts are cut at 500
    characters and lists at 10 entries.
    """
    kind = item.get("type")
    details: dict[str, Any] = {}
    if kind == "web_search_call":
        action = item.get("action") or {}
        if isinstance(action, Mapping):
            if action.get("type"):
                details["action"] = str(action["type"])
            for key in ("query", "url", "pattern"):
                if isinstance(action.get(key), str) and action[key]:
                    details[key] = _cut(action[key])
            if isinstance(action.get("queries"), list):
                details["queries"] = [_cut(str(q)) for q in action["queries"][:_MAX_DETAIL_ITEMS]]
            sources = action.get("sources")
            if isinstance(sources, list):
                urls = [s.get("url") for s in sources if isinstance(s, Mapping) and isinstance(s.get("url"), str)]
                details["sources"] = urls[:_MAX_DETAIL_ITEMS]
    elif kind == "file_search_call":
        queries = item.get("queries")
        if isinstance(queries, list):
            details["queries"] = [_cut(str(q)) for q in queries[:_MAX_DETAIL_ITEMS]]
        results = item.get("results")
        if isinstance(results, list):
            details["result_count"] = len(results)
            names = [r.get("filename") for r in results if isinstance(r, Mapping)]
            details["files"] = [name for name in names if isinstance(name, str)][:_MAX_DETAIL_ITEMS]
    elif kind == "code_interpreter_call":
        if isinstance(item.get("code"), str) and item["code"]:
            details["code"] = _cut(item["code"])
        outputs = item.get("outputs")
        if isinstance(outputs, list):
            logs = [o.get("logs") for o in outputs if isinstance(o, Mapping) and isinstance(o.get("logs"), str)]
            if logs:
                details["logs"] = _cut("".join(logs))
            images = sum(1 for o in outputs if isinstance(o, Mapping) and o.get("type") == "image")
            if images:
                details["images"] = images
    elif kind == "image_generation_call":
        if isinstance(item.get("revised_prompt"), str) and item["revised_prompt"]:
            details["revised_prompt"] = _cut(item["revised_prompt"])
        result = item.get("result")
        details["image"] = isinstance(result, str) and bool(result)
        for key in ("size", "quality", "output_format"):
            if isinstance(item.get(key), str):
                details[key] = item[key]
    return details
