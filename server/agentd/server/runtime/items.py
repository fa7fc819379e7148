"""Conversation items: the plain, protobuf-free record of what was said and done.

A run reads items from its session as history, produces new ones, and the store
persists them. They serialise to small JSON-able dicts (``to_dict``/``item_from_dict``)
so every store keeps the same shape regardless of backend.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Union

Role = Literal["user", "assistant", "system", "developer"]

# The deepest JSON agentd turns into a protobuf Struct/Value (tool call arguments, a run's
# context and final output, session state), counting each object or array as one level.
# A decoder pays up to 3 message levels per JSON level (Struct, its map entry, Value) and
# protobuf's decoders stop at 100 (upb for Python, C++, Java), less the few levels of the
# reply around the Struct (RunResponse > RunEvent > ToolCalled > Item > ToolCall): 20
# keeps every reply parseable by every client with room to spare.
MAX_JSON_DEPTH = 20


@dataclass(slots=True, frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


@dataclass(slots=True, frozen=True)
class ImagePart:
    """An image by URL (http(s) or ``data:``) or as bytes (with their MIME type)."""

    url: str = ""
    data: bytes = b""
    mime_type: str = ""
    detail: str = ""
    type: Literal["image"] = "image"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "image", "url": self.url, "data": _b64(self.data), "mime_type": self.mime_type,
                "detail": self.detail}

    def as_url(self) -> str:
        """The URL a model API takes: ``url``, or the bytes as a base64 ``data:`` URL."""
        return self.url or f"data:{self.mime_type or 'application/octet-stream'};base64,{_b64(self.data)}"


@dataclass(slots=True, frozen=True)
class FilePart:
    """A file by the provider's file id or as bytes (with a filename)."""

    file_id: str = ""
    data: bytes = b""
    filename: str = ""
    mime_type: str = ""
    type: Literal["file"] = "file"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "file", "file_id": self.file_id, "data": _b64(self.data), "filename": self.filename,
                "mime_type": self.mime_type}

    def as_data_url(self) -> str:
        return f"data:{self.mime_type or 'application/octet-stream'};base64,{_b64(self.data)}"


ContentPart = Union[TextPart, ImagePart, FilePart]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def part_from_dict(data: dict[str, Any]) -> ContentPart:
    kind = data.get("type")
    if kind == "text":
        return TextPart(str(data["text"]))
    if kind == "image":
        return ImagePart(url=str(data.get("url") or ""), data=base64.b64decode(data.get("data") or ""),
                         mime_type=str(data.get("mime_type") or ""), detail=str(data.get("detail") or ""))
    if kind == "file":
        return FilePart(file_id=str(data.get("file_id") or ""), data=base64.b64decode(data.get("data") or ""),
                        filename=str(data.get("filename") or ""), mime_type=str(data.get("mime_type") or ""))
    raise ValueError(f"unknown content part type {kind!r}")


def parts_text(parts: tuple[ContentPart, ...]) -> str:
    """A message's display text for its parts: its text parts joined with newlines."""
    return "\n".join(part.text for part in parts if isinstance(part, TextPart))


@dataclass(slots=True, frozen=True)
class MessageItem:
    role: Role
    text: str
    agent: str = ""
    type: Literal["message"] = "message"
    # The content as parts (text, images, files), in order; empty for a text-only message.
    # ``text`` is then the text parts joined (``parts_text``), for display and counting.
    parts: tuple[ContentPart, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = {"type": "message", "role": self.role, "text": self.text, "agent": self.agent}
        if self.parts:
            data["parts"] = [part.to_dict() for part in self.parts]
        return data


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


@dataclass(slots=True, frozen=True)
class SummaryItem:
    """A summary of a session's older items, written by history compaction.

    It is appended at the end of the session. ``kept_items`` is how many items just
    before it the summary does not cover: a run sends the summary first, then those
    items and everything after it verbatim (``history_view``). ``summarised_items``
    counts every item it stands for, including those an earlier summary it folds in
    stood for.
    """

    text: str
    summarised_items: int
    kept_items: int
    agent: str = ""
    type: Literal["summary"] = "summary"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "summary",
            "text": self.text,
            "summarised_items": self.summarised_items,
            "kept_items": self.kept_items,
            "agent": self.agent,
        }


@dataclass(slots=True, frozen=True)
class ReasoningItem:
    """A reasoning model's reasoning before its answer, as the Responses API returns it.

    ``summary`` is what may be shown (the model's summary parts; empty unless summaries were
    asked for). ``encrypted_content`` is the reasoning itself, encrypted by the model
    provider: the session keeps it so the next turn (or run) can send it back to the
    Responses API with ``store=False``, which is what lets the model carry its reasoning
    across tool calls. It never leaves the server (events, ListSessionItems and traces show
    the summary only). The Chat Completions path does not send reasoning items at all.
    """

    id: str
    summary: tuple[str, ...] = ()
    encrypted_content: str = ""
    agent: str = ""
    type: Literal["reasoning"] = "reasoning"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "reasoning",
            "id": self.id,
            "summary": list(self.summary),
            "encrypted_content": self.encrypted_content,
            "agent": self.agent,
        }


Item = Union[MessageItem, ToolCallItem, ToolResultItem, SummaryItem, ReasoningItem]


def item_from_dict(data: dict[str, Any]) -> Item:
    """Rebuild an item from ``to_dict`` output; raises ``ValueError`` on anything else."""
    kind = data.get("type")
    try:
        if kind == "message":
            raw_parts = data.get("parts") or ()
            if not isinstance(raw_parts, (list, tuple)) or not all(isinstance(p, dict) for p in raw_parts):
                raise ValueError("item of type 'message' has parts that are not a list of objects")
            return MessageItem(role=data["role"], text=data["text"], agent=data.get("agent", ""),
                               parts=tuple(part_from_dict(p) for p in raw_parts))
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
        if kind == "summary":
            return SummaryItem(
                text=data["text"],
                summarised_items=int(data["summarised_items"]),
                kept_items=int(data["kept_items"]),
                agent=data.get("agent", ""),
            )
        if kind == "reasoning":
            summary = data.get("summary") or ()
            if not isinstance(summary, (list, tuple)) or not all(isinstance(part, str) for part in summary):
                raise ValueError("item of type 'reasoning' has a summary that is not a list of strings")
            return ReasoningItem(
                id=str(data["id"]),
                summary=tuple(summary),
                encrypted_content=str(data.get("encrypted_content") or ""),
                agent=data.get("agent", ""),
            )
    except KeyError as exc:
        raise ValueError(f"item of type {kind!r} is missing field {exc.args[0]!r}") from None
    raise ValueError(f"unknown item type {kind!r}")


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` (parsed JSON) cannot become a Struct/Value, or None when it can.

    Iterative, so any depth is safe to inspect: nesting past ``max_depth`` levels, and
    numbers JSON cannot hold (NaN, Infinity, integers beyond a double's range).
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                try:
                    finite = math.isfinite(float(node))
                except OverflowError:
                    finite = False
                if not finite:
                    return "holds a number JSON cannot represent (NaN, Infinity or out of range)"
            continue
        if depth + 1 > max_depth:
            return f"nests deeper than {max_depth} levels of objects and arrays"
        stack.extend((child, depth + 1) for child in children)
    return None


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object ``text`` holds when it can be shown as a Struct, else None; never raises.

    None for malformed JSON, anything but an object, nesting past ``MAX_JSON_DEPTH`` and
    numbers JSON cannot hold. Safe on hostile text: ``json.loads`` of very deep nesting
    raises ``RecursionError``, which is caught like any other parse failure.
    """
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, int digit limits, deep nesting
        return None
    if not isinstance(value, dict) or json_problem(value) is not None:
        return None
    return value
