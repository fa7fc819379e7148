"""The one interface every model provider implements.

A model call streams: it yields text deltas (plain ``str``) as they arrive and finishes
with exactly one ``ModelResponse``. Providers raise ``ModelUnavailableError`` for
transient, retried-and-still-failing conditions and ``ModelError`` for rejected requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, Sequence, Union

from agentd.server.runtime.items import Item
from agentd.server.runtime.usage import Usage


@dataclass(slots=True, frozen=True)
class ModelSettings:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    # "auto" | "required" | "none" | a tool name
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    # "minimal" | "low" | "medium" | "high": how hard a reasoning model thinks (None: its default).
    reasoning_effort: str | None = None


@dataclass(slots=True, frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool


@dataclass(slots=True, frozen=True)
class OutputSchema:
    name: str
    schema: dict[str, Any]
    strict: bool = True


@dataclass(slots=True, frozen=True)
class ModelRequest:
    model: str
    instructions: str
    items: Sequence[Item]
    tools: Sequence[ToolSpec] = ()
    settings: ModelSettings = field(default_factory=ModelSettings)
    output_schema: OutputSchema | None = None


@dataclass(slots=True, frozen=True)
class ModelToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text as the model produced it (may be malformed)


@dataclass(slots=True, frozen=True)
class ModelResponse:
    text: str
    tool_calls: tuple[ModelToolCall, ...]
    usage: Usage
    finish_reason: str = ""


ModelChunk = Union[str, ModelResponse]


class Model(Protocol):
    def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        """Yield text deltas, then one ``ModelResponse``."""
        ...


class ModelProvider(Protocol):
    def get_model(self, name: str) -> Model: ...

    async def aclose(self) -> None: ...
