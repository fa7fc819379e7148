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

from agentd.server.models.base import (
    ModelChunk,
    ModelHostedCall,
    ModelReasoning,
    ModelRequest,
    ModelResponse,
    ModelToolCall,
)
from agentd.server.models.script import (
    Script,
    ScriptedHostedCall,
    ScriptedTurn,
    ScriptExhaustedError,
    count_assistant_turns,
)
from agentd.server.runtime.errors import ModelError
from agentd.server.runtime.items import Item, MessageItem, ReasoningItem, SummaryItem, ToolCallItem, ToolResultItem
from agentd.server.runtime.usage import Usage

_WORDS = re.compile(r"\S+\s*|\s+")


def text_chunks(text: str) -> list[str]:
    """Split text into word-sized deltas, whitespace kept, so ``"".join(chunks) == text``."""
    return _WORDS.findall(text)


def new_call_id(turn_index: int, position: int) -> str:
    """A tool call id that is unique even across concurrent runs of the same script."""
    return f"call_{turn_index}_{position}_{uuid.uuid4().hex[:8]}"


def estimate_usage(input_chars: int, turn: ScriptedTurn) -> Usage:
    """Deterministic token counts (~4 characters per token) so usage totals are testable.

    A turn with reasoning also spends reasoning tokens (its summaries' characters / 4, plus
    one per reasoning item), counted in the output tokens as OpenAI counts them, whichever
    API is asked: only the Responses API shows the reasoning items themselves.
    """
    output_chars = len(turn.text) + sum(len(tool_call.arguments_json) for tool_call in turn.tool_calls)
    reasoning = sum(sum(len(part) for part in r.summary) // 4 + 1 for r in turn.reasoning)
    return Usage(
        input_tokens=input_chars // 4 + 1, output_tokens=output_chars // 4 + 1 + reasoning, requests=1,
        reasoning_tokens=reasoning,
    )


def reasoning_id(turn_index: int, position: int) -> str:
    """A reasoning item id, unique like ``new_call_id``'s."""
    return f"rs_{turn_index}_{position}_{uuid.uuid4().hex[:8]}"


def encrypted_reasoning(summary: tuple[str, ...]) -> str:
    """The scripted stand-in for a reasoning item's encrypted content: opaque, and distinct
    per answer so tests can check that exactly this value is sent back."""
    return f"enc_{uuid.uuid4().hex}_{sum(len(part) for part in summary)}"


def hosted_call_id(tool: str, turn_index: int, position: int) -> str:
    prefix = {"web_search": "ws", "file_search": "fs", "code_interpreter": "ci", "image_generation": "ig"}[tool]
    return f"{prefix}_{turn_index}_{position}_{uuid.uuid4().hex[:8]}"


def hosted_details(call: ScriptedHostedCall) -> dict[str, object]:
    """A scripted hosted call's ``details``, shaped as ``responses_format.hosted_call_details``
    summarises a real one (so both paths report alike)."""
    from agentd.server.models.responses_format import hosted_call_details

    return hosted_call_details(hosted_output_item(call, "id"))


def hosted_output_item(call: ScriptedHostedCall, item_id: str) -> dict[str, object]:
    """The Responses API output item of a scripted hosted call (``web_search_call``...)."""
    action = call.action
    if call.tool == "web_search":
        search: dict[str, object] = {"type": "search", "query": action.get("query", "")}
        if action.get("sources"):
            search["sources"] = [{"type": "url", "url": url} for url in action["sources"]]
        return {"id": item_id, "type": "web_search_call", "status": call.status, "action": search}
    if call.tool == "file_search":
        queries = action.get("queries") or []
        results = [
            {"file_id": f"file_{i}", "filename": name, "score": 1.0, "text": "", "attributes": {}}
            for i, name in enumerate(action.get("results") or [])
        ]
        return {"id": item_id, "type": "file_search_call", "status": call.status, "queries": list(queries),
                "results": results}
    if call.tool == "code_interpreter":
        outputs = [{"type": "logs", "logs": action["logs"]}] if action.get("logs") else []
        return {"id": item_id, "type": "code_interpreter_call", "status": call.status,
                "code": action.get("code", ""), "container_id": "cntr_scripted", "outputs": outputs}
    return {"id": item_id, "type": "image_generation_call", "status": call.status, "result": "aW1hZ2U=",
            "revised_prompt": action.get("prompt", "")}


def _role(item: Item) -> str | None:
    if isinstance(item, SummaryItem):
        return None
    if isinstance(item, ReasoningItem):
        return "assistant"  # part of the assistant turn it precedes
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
    if isinstance(item, ReasoningItem):
        return 0  # not counted: the Chat Completions path does not send it
    assert isinstance(item, ToolResultItem)
    return len(item.output)


class ScriptedModel:
    """Answers each request with the script turn its conversation has reached.

    A request on the Responses API (``request.api == "responses"``) also gets the turn's
    hosted calls (streamed) and reasoning items, as the HTTP server's ``/v1/responses`` does;
    any other request, neither (as ``/v1/chat/completions``).
    """

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
        responses = request.api == "responses"
        reasoning: list[ModelReasoning] = []
        if responses:
            for position, step in enumerate(turn.steps):
                if isinstance(step, ScriptedHostedCall):
                    yield ModelHostedCall(
                        step.tool, hosted_call_id(step.tool, index, position), step.status, hosted_details(step)
                    )
                elif _kept(turn, position):
                    reasoning.append(
                        ModelReasoning(reasoning_id(index, position), step.summary, encrypted_reasoning(step.summary))
                    )
        for position, chunk in enumerate(text_chunks(turn.text)):
            if position and turn.chunk_delay_s > 0:
                await asyncio.sleep(turn.chunk_delay_s)
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
            reasoning=tuple(reasoning),
        )


def _kept(turn: ScriptedTurn, position: int) -> bool:
    """Whether the reasoning step at ``position`` is kept, by ``responses_format.keep_reasoning``'s
    rule: the next output item is a message or a function call (not a hosted call)."""
    later = turn.steps[position + 1 :]
    if later:
        return not isinstance(later[0], ScriptedHostedCall) and _kept(turn, position + 1)
    return bool(turn.text or turn.tool_calls)


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
