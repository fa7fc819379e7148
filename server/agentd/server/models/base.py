"""The one interface every model provider implements.

A model call streams: it yields text deltas (plain ``str``) as they arrive, a
``ModelHostedCall`` whenever a hosted tool call (web search...) the model provider ran
finished, and finishes with exactly one ``ModelResponse``. Providers raise
``ModelUnavailableError`` for transient, retried-and-still-failing conditions and
``ModelError`` for rejected requests.

``ModelRequest.api`` picks the wire API of providers that speak several ("responses" or
"chat_completions"; None: the provider's own choice), so one provider serves agents on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Mapping, Protocol, Sequence, Union

from agentd.server.runtime.errors import ModelError
from agentd.server.runtime.items import Item
from agentd.server.runtime.usage import Usage


# The wire APIs of OpenAI-style providers: an agent's ``model_api`` (None: the provider's default).
ModelApi = Literal["responses", "chat_completions"]
MODEL_APIS: tuple[str, ...] = ("responses", "chat_completions")
# Tools the model provider runs itself (Responses API only); an agent declares them as
# ``{"type": <one of these>, ...options}``, sent in the request's ``tools`` as written.
HOSTED_TOOL_TYPES: tuple[str, ...] = ("web_search", "file_search", "code_interpreter", "image_generation")


def hosted_tool_problem(spec: Any) -> str | None:
    """Why ``spec`` is not a usable hosted tool declaration, or None when it is."""
    if not isinstance(spec, Mapping):
        return f"a hosted tool is a mapping like {{'type': 'web_search'}}, not a {type(spec).__name__}"
    kind = spec.get("type")
    if kind not in HOSTED_TOOL_TYPES:
        return f"hosted tool type {kind!r} is not one of {', '.join(HOSTED_TOOL_TYPES)}"
    if kind == "file_search":
        ids = spec.get("vector_store_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            return "a file_search hosted tool needs vector_store_ids: a non-empty list of vector store ids"
    return None


def hosted_tool_param(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A hosted tool declaration as the Responses API takes it (code_interpreter's container
    defaults to an automatic one)."""
    param = dict(spec)
    if param.get("type") == "code_interpreter":
        param.setdefault("container", {"type": "auto"})
    return param


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
    # "auto" | "concise" | "detailed": ask a reasoning model for summaries of its reasoning
    # (Responses API only; None: none asked, the session's reasoning items have no summary).
    reasoning_summary: str | None = None


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
    # "responses" | "chat_completions": the wire API (None: the provider's default).
    api: str | None = None
    # Hosted tool declarations (``hosted_tool_problem``), sent beside the function tools.
    hosted_tools: tuple[Mapping[str, Any], ...] = ()


@dataclass(slots=True, frozen=True)
class ModelToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text as the model produced it (may be malformed)


@dataclass(slots=True, frozen=True)
class ModelReasoning:
    """A reasoning item of the turn: its provider id, summary parts and encrypted content."""

    id: str
    summary: tuple[str, ...] = ()
    encrypted_content: str = ""


@dataclass(slots=True, frozen=True)
class ModelHostedCall:
    """A hosted tool call the model provider ran during the turn (streamed as it finishes).

    ``tool``: "web_search", "file_search", "code_interpreter" or "image_generation";
    ``call_id``: the provider's id of the call; ``status``: as the provider reports it
    ("completed", "failed", "incomplete"...); ``details``: a small JSON summary of what it
    did and found (a search's query and sources, a file search's result count...), never a
    whole result (no image data, no file contents).
    """

    tool: str
    call_id: str
    status: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ModelResponse:
    text: str
    tool_calls: tuple[ModelToolCall, ...]
    usage: Usage
    finish_reason: str = ""
    # Reasoning items to keep in the session, in the order the model produced them.
    reasoning: tuple[ModelReasoning, ...] = ()


ModelChunk = Union[str, ModelHostedCall, ModelResponse]


class Model(Protocol):
    def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        """Yield text deltas, then one ``ModelResponse``."""
        ...


class ModelProvider(Protocol):
    def get_model(self, name: str) -> Model: ...

    async def aclose(self) -> None: ...


def token_count(value: object) -> int:
    """A token count an endpoint reported, or 0 when it sent none or something that is not one."""
    return value if type(value) is int and value > 0 else 0


def malformed_stream(endpoint: str, model: str) -> ModelError:
    """The error for a streamed chunk that is not JSON (a broken proxy, a truncated line)."""
    return ModelError(f"model endpoint {endpoint} sent a malformed stream chunk for model {model!r} (not JSON)")
