"""Conversion between agentd items and Chat Completions messages.

Kept as pure functions so the OpenAI model (which sends messages) and the scripted
OpenAI-compatible server (which reads them back to pick a turn) agree on one shape.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from agentd.server.runtime.items import (
    FilePart,
    ImagePart,
    Item,
    MessageItem,
    SummaryItem,
    TextPart,
    ToolCallItem,
    ToolResultItem,
)

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
            # Chat Completions has no developer role on every provider: a developer message
            # goes as a system message, as the instructions do.
            role = "system" if item.role == "developer" else item.role
            message: dict[str, Any] = {"role": role, "content": chat_content(item)}
            if item.role == "assistant":
                assistant = message
            messages.append(message)
    return messages


def chat_content(item: MessageItem) -> str | list[dict[str, Any]]:
    """A message's ``content``: its text, or (with parts) a list of content parts.

    Images are ``image_url`` parts (bytes as a base64 ``data:`` URL), only in user messages
    (the API takes them nowhere else: elsewhere they become a text note). Files become a
    text note naming them, as Chat Completions cannot take arbitrary files everywhere.
    """
    if not item.parts:
        return item.text
    if item.role != "user":  # assistant/system content must be text: images and files as notes
        return "\n".join(_part_note(part) for part in item.parts)
    content: list[dict[str, Any]] = []
    for part in item.parts:
        if isinstance(part, ImagePart):
            image: dict[str, Any] = {"url": part.as_url()}
            if part.detail:
                image["detail"] = part.detail
            content.append({"type": "image_url", "image_url": image})
        else:
            content.append({"type": "text", "text": _part_note(part)})
    return content


def _part_note(part: TextPart | ImagePart | FilePart) -> str:
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, ImagePart):
        return f"[image: {part.url if part.url and not part.url.startswith('data:') else part.mime_type or 'inline'}]"
    return f"[file: {part.filename or part.file_id}]"


def summary_message(item: SummaryItem) -> str:
    """How a compaction summary reads to the model."""
    return f"Summary of the earlier conversation ({item.summarised_items} items):\n{item.text}"


def chat_roles(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """The "user"/"assistant"/"tool" markers ``count_assistant_turns`` expects.

    System (and developer) messages are skipped: they are not part of the exchange.
    """
    return [role for message in messages if (role := message.get("role")) in _TURN_ROLES]
