"""The built-in scripted model: deterministic answers, in process, no HTTP.

Offline demos and benchmarks run agents against it; benchmarks use it with zero delay to
measure the runtime's own overhead, so the hot path stays lean (no sleep, no I/O).
``agentd.testing.ScriptedOpenAIServer`` serves the same scripts over HTTP and shares the
chunking, usage and call-id helpers below, so both behave alike.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import AsyncIterator, Mapping

from agentd.server.models.base import ModelChunk, ModelRequest, ModelResponse, ModelToolCall
from agentd.server.models.script import Script, ScriptedTurn, ScriptExhaustedError, count_assistant_turns
from agentd.server.runtime.errors import ModelError
from agentd.server.runtime.items import Item, MessageItem, SummaryItem, ToolCallItem, ToolResultItem
from agentd.server.runtime.usage import Usage

_WORDS = re.compile(r"\S+\s*|\s+")


def text_chunks(text: str) -> list[str]:
    """Split text into word-sized deltas, whitespace kept, so ``"".join(chunks) == text``."""
    return _WORDS.findall(text)


def new_call_id(turn_index: int, position: int) -> str:
    """A tool call id that is unique even across concurrent runs of the same script."""
    return f"call_{turn_index}_{position}_{uuid.uuid4().hex[:8]}"


def estimate_usage(input_chars: int, turn: ScriptedTurn) -> Usage:
    """Deterministic token counts (~4 characters per token) so usage totals are testable."""
    output_chars = len(turn.text) + sum(len(tool_call.arguments_json) for tool_call in turn.tool_calls)
    return Usage(input_tokens=input_chars // 4 + 1, output_tokens=output_chars // 4 + 1, requests=1)


def _role(item: Item) -> str | None:
    if isinstance(item, SummaryItem):
        return None
    if isinstance(item, MessageItem):
        return None if item.role == "system" else item.role
    if isinstance(item, ToolCallItem):
        return "assistant"
    return "tool"


def _item_chars(item: Item) -> int:
    if isinstance(item, (MessageItem, SummaryItem)):
        return len(item.text)
    if isinstance(item, ToolCallItem):
        return len(item.arguments)
    assert isinstance(item, ToolResultItem)
    return len(item.output)


class ScriptedModel:
    """Answers each request with the script turn its conversation has reached."""

    def __init__(self, name: str, script: Script) -> None:
        self.name = name
        self.script = script

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        index = count_assistant_turns(role for item in request.items if (role := _role(item)) is not None)
        try:
            turn = self.script.turn(index)
        except ScriptExhaustedError as exc:
            raise ModelError(str(exc)) from None
        if turn.delay_s > 0:
            await asyncio.sleep(turn.delay_s)
        for chunk in text_chunks(turn.text):
            yield chunk
        tool_calls = tuple(
            ModelToolCall(call_id=new_call_id(index, position), name=tool_call.name, arguments=tool_call.arguments_json)
            for position, tool_call in enumerate(turn.tool_calls)
        )
        input_chars = len(request.instructions) + sum(_item_chars(item) for item in request.items)
        yield ModelResponse(
            text=turn.text,
            tool_calls=tool_calls,
            usage=estimate_usage(input_chars, turn),
            finish_reason="tool_calls" if tool_calls else "stop",
        )


class ScriptedProvider:
    """Serves scripts by model name, falling back to ``default`` for any other name."""

    def __init__(self, scripts: Mapping[str, Script] | None = None, default: Script | None = None) -> None:
        self._scripts = dict(scripts or {})
        self._default = default
        self._models: dict[str, ScriptedModel] = {}

    def get_model(self, name: str) -> ScriptedModel:
        model = self._models.get(name)
        if model is None:
            script = self._scripts.get(name, self._default)
            if script is None:
                known = ", ".join(sorted(self._scripts)) or "none"
                raise ModelError(f"no script for model {name!r} and no default script (known scripts: {known})")
            model = self._models[name] = ScriptedModel(name, script)
        return model

    async def aclose(self) -> None:
        """Nothing to release: scripted models hold no connections."""
