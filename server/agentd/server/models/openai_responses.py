"""Models on the OpenAI Responses API (``POST /v1/responses``, streamed).

The Responses API is OpenAI's own agentic API: beside text and function calls it returns
reasoning items (a reasoning model's reasoning, encrypted, with an optional summary) and
runs hosted tools (web search, file search, code interpreter, image generation) itself.
Requests are stateless (``store=False``, the whole conversation in ``input``; see
``responses_format``), asking for ``include=["reasoning.encrypted_content"]`` so reasoning
can be sent back on later turns. A model that does not take encrypted reasoning (the
API's 400 on ``include``: gpt-4o, gpt-4.1...) is asked again without it, once, and from
then on this model sends neither ``include`` nor reasoning items.

It shares the provider's ``AsyncOpenAI`` client with the Chat Completions models, so
retries, backoff, timeouts and the error mapping are the same (``translate_openai_error``).
The request is ``responses.create(stream=True)``'s, made with the client's ``post`` so the
streamed events stay JSON dicts (``openai_chat.post_streamed``).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx2 as httpx
import openai

from agentd.server.models.base import (
    ModelChunk,
    ModelHostedCall,
    ModelReasoning,
    ModelRequest,
    ModelResponse,
    ModelSettings,
    ModelToolCall,
    hosted_tool_param,
    malformed_stream,
    token_count,
)
from agentd.server.models.openai_chat import post_streamed, translate_openai_error
from agentd.server.models.sse import json_events
from agentd.server.models.responses_format import (
    HOSTED_CALL_TYPES,
    hosted_call_details,
    keep_reasoning,
    to_responses_input,
)
from agentd.server.redaction import display_url, redact, url_password
from agentd.server.runtime.errors import ModelError, ModelUnavailableError
from agentd.server.runtime.usage import Usage

log = logging.getLogger("agentd.model")

INCLUDE_ENCRYPTED_REASONING = "reasoning.encrypted_content"
# Response error codes (``response.failed``) worth retrying later: the run fails as unavailable.
_TRANSIENT_CODES = {"server_error", "rate_limit_exceeded", "vector_store_timeout"}
# Why an incomplete response stopped, as a Chat Completions finish_reason.
_INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


def _tool_choice(choice: str) -> str | dict[str, Any]:
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "name": choice}


def _settings_params(settings: ModelSettings, has_tools: bool) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if settings.temperature is not None:
        params["temperature"] = settings.temperature
    if settings.top_p is not None:
        params["top_p"] = settings.top_p
    if settings.max_tokens is not None:
        params["max_output_tokens"] = settings.max_tokens
    reasoning: dict[str, Any] = {}
    if settings.reasoning_effort is not None:
        reasoning["effort"] = settings.reasoning_effort
    if settings.reasoning_summary is not None:
        reasoning["summary"] = settings.reasoning_summary
    if reasoning:
        params["reasoning"] = reasoning
    if has_tools:
        if settings.tool_choice is not None:
            params["tool_choice"] = _tool_choice(settings.tool_choice)
        if settings.parallel_tool_calls is not None:
            params["parallel_tool_calls"] = settings.parallel_tool_calls
    return params


def responses_params(model: str, request: ModelRequest, *, encrypted_reasoning: bool = True) -> dict[str, Any]:
    """The keyword arguments of ``responses.create`` for one streamed model call."""
    params: dict[str, Any] = {
        "model": model,
        "input": to_responses_input(request.items, reasoning=encrypted_reasoning),
        "stream": True,
        "store": False,
    }
    if encrypted_reasoning:
        params["include"] = [INCLUDE_ENCRYPTED_REASONING]
    if request.instructions:
        params["instructions"] = request.instructions
    tools: list[dict[str, Any]] = [
        {
            "type": "function",
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
            "strict": tool.strict,
        }
        for tool in request.tools
    ]
    tools.extend(hosted_tool_param(spec) for spec in request.hosted_tools)
    if tools:
        params["tools"] = tools
    if request.output_schema is not None:
        schema = request.output_schema
        params["text"] = {
            "format": {"type": "json_schema", "name": schema.name, "schema": schema.schema, "strict": schema.strict}
        }
    params.update(_settings_params(request.settings, bool(tools)))
    return params


def _refuses_encrypted_reasoning(exc: openai.OpenAIError) -> bool:
    """The API's answer to ``include=["reasoning.encrypted_content"]`` for a model without it."""
    if not isinstance(exc, openai.BadRequestError):
        return False
    message = str(exc.message or "").lower()
    return exc.param == "include" or "encrypted content is not supported" in message


@dataclass(slots=True)
class _PartialCall:
    """A streamed function call: id and name arrive with the item, the arguments in pieces."""

    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    done: str | None = None  # the final arguments, once the item is done


class OpenAIResponsesModel:
    """One model name on a shared ``AsyncOpenAI`` client, over the Responses API."""

    def __init__(self, client: openai.AsyncOpenAI, name: str) -> None:
        self._client = client
        self.name = name
        # False once the model refused encrypted reasoning: then neither asked for nor sent.
        self.encrypted_reasoning = True

    async def _post(self, params: dict[str, Any]) -> httpx.Response:
        return await post_streamed(self._client, "/responses", params)

    async def _create(self, request: ModelRequest) -> httpx.Response:
        try:
            return await self._post(responses_params(self.name, request, encrypted_reasoning=self.encrypted_reasoning))
        except openai.OpenAIError as exc:
            if not (self.encrypted_reasoning and _refuses_encrypted_reasoning(exc)):
                raise translate_openai_error(self._client, self.name, exc) from exc
            log.info("model %r takes no encrypted reasoning; asking without it", self.name)
            self.encrypted_reasoning = False
        try:
            return await self._post(responses_params(self.name, request, encrypted_reasoning=False))
        except openai.OpenAIError as exc:
            raise translate_openai_error(self._client, self.name, exc) from exc

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        http_response = await self._create(request)
        # Text by output item id (deltas), so a message whose deltas never came is read whole.
        texts: dict[str, list[str]] = {}
        text_order: list[str] = []
        refusal: list[str] = []
        calls: dict[int, _PartialCall] = {}
        # Done output items, in output order: (output_index, item).
        done: list[tuple[int, dict[str, Any]]] = []
        usage = Usage(requests=1)
        finish_reason = ""
        completed = False
        # The finally closes the HTTP response whether the stream ends, fails, or the
        # consumer stops early or is cancelled: an unclosed response pins a connection.
        try:
            async for event in json_events(http_response):
                if not isinstance(event, dict):
                    continue
                kind = event.get("type")
                if kind == "response.output_text.delta":
                    item_id = _text(event.get("item_id"))
                    if item_id not in texts:
                        texts[item_id] = []
                        text_order.append(item_id)
                    delta = _text(event.get("delta"))
                    if delta:
                        texts[item_id].append(delta)
                        yield delta
                elif kind == "response.refusal.delta":
                    refusal.append(_text(event.get("delta")))
                elif kind == "response.output_item.added":
                    item = _object(event.get("item"))
                    if item.get("type") == "function_call":
                        partial = _PartialCall(_text(item.get("call_id")), _text(item.get("name")))
                        calls[_index(event, 0)] = partial
                elif kind == "response.function_call_arguments.delta":
                    partial = calls.setdefault(_index(event, 0), _PartialCall())
                    partial.arguments.append(_text(event.get("delta")))
                elif kind == "response.output_item.done":
                    item = _object(event.get("item"))
                    item_type = item.get("type")
                    index = _index(event, len(done))
                    done.append((index, item))
                    if item_type == "function_call":
                        partial = calls.setdefault(index, _PartialCall())
                        partial.call_id = _text(item.get("call_id")) or partial.call_id
                        partial.name = _text(item.get("name")) or partial.name
                        if isinstance(item.get("arguments"), str):
                            partial.done = item["arguments"]
                    elif item_type == "message":
                        item_id = _text(item.get("id"))
                        if item_id not in texts:  # no deltas came for it: its text, whole
                            whole = "".join(
                                _text(part.get("text"))
                                for part in _list(item.get("content"))
                                if isinstance(part, dict) and part.get("type") == "output_text"
                            )
                            texts[item_id] = [whole]
                            text_order.append(item_id)
                            if whole:
                                yield whole
                    elif isinstance(item_type, str) and item_type in HOSTED_CALL_TYPES:
                        yield ModelHostedCall(
                            HOSTED_CALL_TYPES[item_type], str(item.get("id") or ""), str(item.get("status") or ""),
                            hosted_call_details(item),
                        )
                elif kind in ("response.completed", "response.incomplete"):
                    completed = True
                    response = _object(event.get("response"))
                    usage = _usage(response.get("usage"))
                    if kind == "response.incomplete":
                        reason = _text(_object(response.get("incomplete_details")).get("reason")) or "incomplete"
                        finish_reason = _INCOMPLETE_REASONS.get(reason, reason)
                elif kind == "response.failed":
                    raise self._failed(_object(_object(event.get("response")).get("error")))
                elif kind == "error":
                    raise self._failed(event)
        except json.JSONDecodeError:
            raise malformed_stream(self._endpoint(), self.name) from None
        except openai.OpenAIError as exc:
            raise translate_openai_error(self._client, self.name, exc) from exc
        finally:
            await http_response.aclose()

        if not completed:
            raise ModelUnavailableError(
                f"model endpoint {self._endpoint()} ended the response of model {self.name!r} before it completed"
            )
        text = "".join("".join(texts[item_id]) for item_id in text_order)
        if refusal and not text:
            raise ModelError(f"model {self.name!r} refused to answer: {''.join(refusal)}")
        done.sort(key=lambda entry: entry[0])
        kept = keep_reasoning([str(item.get("type")) for _, item in done])
        reasoning = tuple(
            ModelReasoning(
                id=str(item.get("id") or ""),
                summary=tuple(
                    str(part.get("text") or "") for part in _list(item.get("summary")) if isinstance(part, dict)
                ),
                encrypted_content=str(item.get("encrypted_content") or ""),
            )
            for (_, item), keep in zip(done, kept)
            if keep
        )
        tool_calls = tuple(
            ModelToolCall(
                # The API always gives call ids; replaying the conversation needs one regardless.
                call_id=partial.call_id or f"call_{uuid.uuid4().hex[:12]}",
                name=partial.name,
                arguments=partial.done if partial.done is not None else "".join(partial.arguments),
            )
            for _, partial in sorted(calls.items())
        )
        yield ModelResponse(
            text=text,
            tool_calls=tool_calls,
            usage=usage,
            finish_reason=finish_reason or ("tool_calls" if tool_calls else "stop"),
            reasoning=reasoning,
        )

    def _endpoint(self) -> str:
        return display_url(str(self._client.base_url))

    def _failed(self, error: dict[str, Any]) -> ModelError | ModelUnavailableError:
        """A ``response.failed`` (or stream ``error``) as agentd's error: transient codes as
        unavailable, the rest as refused."""
        code = str(error.get("code") or "")
        message = str(error.get("message") or "no message")
        message = redact(message, (self._client.api_key, url_password(str(self._client.base_url))))[:500]
        where = f"model endpoint {self._endpoint()}"
        what = f"{where} failed the response of model {self.name!r}" + (f" ({code})" if code else "")
        if code in _TRANSIENT_CODES:
            return ModelUnavailableError(f"{what}: {message}")
        return ModelError(f"{what}: {message}")


def _object(value: Any) -> dict[str, Any]:
    """A JSON object the endpoint sent, or an empty one where it sent something else."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _index(event: dict[str, Any], default: int) -> int:
    """An event's ``output_index``: where its item sits in the response's output."""
    index = event.get("output_index")
    return index if type(index) is int else default


def _usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage(requests=1)
    details = usage.get("output_tokens_details")
    input_details = usage.get("input_tokens_details")
    return Usage(
        token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens")), requests=1,
        reasoning_tokens=token_count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0,
        # Of the input tokens, those read from the provider's prompt cache (billed at its cached price).
        cached_input_tokens=(
            token_count(input_details.get("cached_tokens")) if isinstance(input_details, dict) else 0
        ),
    )
