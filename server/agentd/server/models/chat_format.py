"""Conversion between agentd items and Chat Completions messages.

Kept as pure functions so the OpenAI model (which sends messages) and the scripted
OpenAI-compatible server (which reads them back to pick a turn) agree on one shape.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from agentd.server.runtime.items import Item, MessageItem, SummaryItem, ToolCallItem, ToolResultItem

_TURN_ROLES = frozenset({"user", "assistant", "tool"})


def to_chat_messages(instructions: str, items: Iterable[Item]) -> list[dict[str, Any]]:
    """Build the ``messages`` list for a Chat Completions request.

    An assistant text and the tool calls that directly follow it become ONE assistant
    message, because that is how the model produced them; the API rejects a tool
    message whose call is not declared by the preceding assistant message.
    """
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    # The assistant message that following tool calls attach to, if any.
    assistant: dict[str, Any] | None = None
    for item in items:
        if isinstance(item, ToolCallItem):
            if assistant is None:
                assistant = {"role": "assistant", "content": None}
                messages.append(assistant)
            elif not assistant["content"]:
                assistant["content"] = None
            assistant.setdefault("tool_calls", []).append(
                {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.tool_name, "arguments": item.arguments},
                }
            )
            continue
        assistant = None
        if isinstance(item, ToolResultItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        elif isinstance(item, SummaryItem):
            # Context, not a turn of the exchange: a system message, like the instructions.
            messages.append({"role": "system", "content": summary_message(item)})
        elif isinstance(item, MessageItem):
            message: dict[str, Any] = {"role": item.role, "content": item.text}
            if item.role == "assistant":
                assistant = message
            messages.append(message)
    return messages


def summary_message(item: SummaryItem) -> str:
    """How a compaction summary reads to the model."""
    return f"Summary of the earlier conversation ({item.summarised_items} items):\n{item.text}"


def chat_roles(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """The "user"/"assistant"/"tool" markers ``count_assistant_turns`` expects.

    System (and developer) messages are skipped: they are not part of the exchange.
    """
    return [role for message in messages if (role := message.get("role")) in _TURN_ROLES]
