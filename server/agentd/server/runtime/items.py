"""Conversation items: the plain, protobuf-free record of what was said and done.

A run reads items from its session as history, produces new ones, and the store
persists them. They serialise to small JSON-able dicts (``to_dict``/``item_from_dict``)
so every store keeps the same shape regardless of backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

Role = Literal["user", "assistant", "system"]


@dataclass(slots=True, frozen=True)
class MessageItem:
    role: Role
    text: str
    agent: str = ""
    type: Literal["message"] = "message"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "message", "role": self.role, "text": self.text, "agent": self.agent}


@dataclass(slots=True, frozen=True)
class ToolCallItem:
    call_id: str
    tool_name: str
    arguments: str  # the model's JSON text, verbatim: it is replayed to the model as is
    agent: str = ""
    type: Literal["tool_call"] = "tool_call"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "tool_call",
            "call_id": self.call_id,
            "tool_name": self.tool_name,
            "arguments": self.arguments,
            "agent": self.agent,
        }


@dataclass(slots=True, frozen=True)
class ToolResultItem:
    call_id: str
    tool_name: str
    output: str
    is_error: bool = False
    agent: str = ""
    type: Literal["tool_result"] = "tool_result"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "tool_result",
            "call_id": self.call_id,
            "tool_name": self.tool_name,
            "output": self.output,
            "is_error": self.is_error,
            "agent": self.agent,
        }


Item = Union[MessageItem, ToolCallItem, ToolResultItem]


def item_from_dict(data: dict[str, Any]) -> Item:
    """Rebuild an item from ``to_dict`` output; raises ``ValueError`` on anything else."""
    kind = data.get("type")
    try:
        if kind == "message":
            return MessageItem(role=data["role"], text=data["text"], agent=data.get("agent", ""))
        if kind == "tool_call":
            return ToolCallItem(
                call_id=data["call_id"],
                tool_name=data["tool_name"],
                arguments=data["arguments"],
                agent=data.get("agent", ""),
            )
        if kind == "tool_result":
            return ToolResultItem(
                call_id=data["call_id"],
                tool_name=data["tool_name"],
                output=data["output"],
                is_error=bool(data.get("is_error", False)),
                agent=data.get("agent", ""),
            )
    except KeyError as exc:
        raise ValueError(f"item of type {kind!r} is missing field {exc.args[0]!r}") from None
    raise ValueError(f"unknown item type {kind!r}")
