"""Models served by any OpenAI-compatible Chat Completions endpoint, and the OpenAI provider.

Chat Completions is what OpenAI-compatible servers (vLLM, Ollama, LiteLLM, agentd's own
scripted test server...) implement, so one model class covers them all. OpenAI's own
endpoint is better used through the Responses API (``openai_responses``): reasoning items,
hosted tools. ``OpenAIProvider`` serves both on one client and picks per request
(``ModelRequest.api``: the agent's ``model_api``), else by its own ``api`` setting: "auto"
is the Responses API for OpenAI's endpoint and Chat Completions for any other base URL.
Retries, backoff and timeouts are left to the openai client, configured once by the provider.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Union
from urllib.parse import urlsplit

import aiohttp
import httpx2 as httpx
import openai

from agentd.server.models.base import (
    MODEL_APIS,
    ModelChunk,
    ModelRequest,
    ModelResponse,
    ModelSettings,
    ModelToolCall,
    malformed_stream,
    token_count,
)
from agentd.server.models.chat_format import to_chat_messages
from agentd.server.models.sse import json_events
from agentd.server.redaction import display_url, redact, url_password
from agentd.server.runtime.errors import AgentdError, ModelError, ModelUnavailableError
from agentd.server.runtime.usage import Usage

if TYPE_CHECKING:
    from agentd.server.models.openai_responses import OpenAIResponsesModel

log = logging.getLogger("agentd.model")
# OpenAI's own endpoint: where "auto" picks the Responses API.
OPENAI_API_HOST = "api.openai.com"

# Upstream answers whose body is never forwarded: an authentication failure is where a
# server (or a proxy) echoes the credentials it was sent. The caller gets what to check.
_AUTH_FAILURES = {
    401: "authentication failed; check the server's model API key",
    403: "permission denied; check the server's model API key and its access to the model",
    407: "proxy authentication failed; check the server's proxy credentials",
}
# An upstream message forwarded to the caller is cut to this many characters.
_MAX_UPSTREAM_MESSAGE = 500
# The openai client's HTTP library logs every request's URL at INFO, user info included.
_HTTP_LOGGERS = ("httpx", "httpx2")


class _RedactingFilter(logging.Filter):
    """Masks credentials (``user:password@`` in URLs...) in the HTTP library's log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _redact_http_logs() -> None:
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactingFilter) for f in logger.filters):
            logger.addFilter(_RedactingFilter())


@dataclass(slots=True)
class _PartialToolCall:
    """A streamed tool call: id and name arrive first, the arguments in pieces."""

    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


def _tool_choice(choice: str) -> str | dict[str, Any]:
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _settings_params(settings: ModelSettings, has_tools: bool) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if settings.temperature is not None:
        params["temperature"] = settings.temperature
    if settings.top_p is not None:
        params["top_p"] = settings.top_p
    if settings.max_tokens is not None:
        # `max_tokens` is deprecated by OpenAI and refused by its reasoning models.
        params["max_completion_tokens"] = settings.max_tokens
    if settings.reasoning_effort is not None:
        params["reasoning_effort"] = settings.reasoning_effort
    # The API rejects tool options on a request that declares no tools.
    if has_tools:
        if settings.tool_choice is not None:
            params["tool_choice"] = _tool_choice(settings.tool_choice)
        if settings.parallel_tool_calls is not None:
            params["parallel_tool_calls"] = settings.parallel_tool_calls
    return params


def _chat_params(model: str, request: ModelRequest) -> dict[str, Any]:
    """The keyword arguments of ``chat.completions.create`` for one streamed model call."""
    params: dict[str, Any] = {
        "model": model,
        "messages": to_chat_messages(request.instructions, request.items),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        params["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                    "strict": tool.strict,
                },
            }
            for tool in request.tools
        ]
    if request.output_schema is not None:
        schema = request.output_schema
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": schema.name, "schema": schema.schema, "strict": schema.strict},
        }
    params.update(_settings_params(request.settings, bool(request.tools)))
    return params


async def post_streamed(client: openai.AsyncOpenAI, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST a streamed request and return its raw HTTP response, body unread (see ``sse``).

    ``chat.completions.create``/``responses.create`` without their costs that buy nothing
    here: the params' transform (a no-op for the plain JSON agentd builds), a pydantic model
    per streamed chunk, and the client's per-event stream machinery, which at a thousand
    concurrent runs were most of the server's CPU (see bench/bench_scale.py). Retries,
    timeouts, authentication and error statuses are the client's, exactly as ``create`` has
    them. The caller reads it with ``sse.json_events`` and closes it.

    It first yields to the event loop once: building and sending the request is a few
    hundred microseconds of CPU before the call first waits, and events the run emitted just
    before (``run_started``...) should reach their streams first, not after it.
    """
    await asyncio.sleep(0)
    response: httpx.Response = await client.post(
        path, body=body, cast_to=httpx.Response, options={"security": {"bearer_auth": True}}, stream=True
    )
    return response


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The objects of a JSON array, whatever else a compatible server put in it (or nothing)."""
    return [entry for entry in value if isinstance(entry, dict)] if isinstance(value, list) else []


def _chat_usage(reported: dict[str, Any]) -> Usage:
    details = reported.get("completion_tokens_details")
    prompt_details = reported.get("prompt_tokens_details")
    return Usage(
        token_count(reported.get("prompt_tokens")), token_count(reported.get("completion_tokens")), requests=1,
        reasoning_tokens=token_count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0,
        # Of the prompt tokens, those read from the provider's prompt cache (billed at its cached price).
        cached_input_tokens=(
            token_count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
        ),
    )


class OpenAIChatModel:
    """One model name on a shared ``AsyncOpenAI`` client."""

    def __init__(self, client: openai.AsyncOpenAI, name: str) -> None:
        self._client = client
        self.name = name

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        try:
            # The name this model was resolved by, so requests, errors and cache agree.
            response = await post_streamed(self._client, "/chat/completions", _chat_params(self.name, request))
        except openai.OpenAIError as exc:
            raise self._translate(exc) from exc

        text: list[str] = []
        refusal: list[str] = []
        calls: dict[int, _PartialToolCall] = {}
        finish_reason = ""
        usage = Usage(requests=1)
        # The chunks are the JSON objects the endpoint sent (see ``post_streamed``), read
        # defensively: a compatible server may omit or null any field.
        # The finally closes the HTTP response whether the stream ends, fails, or the
        # consumer stops early or is cancelled: an unclosed response pins a connection.
        try:
            async for chunk in json_events(response):
                if not isinstance(chunk, dict):
                    continue
                reported = chunk.get("usage")
                if isinstance(reported, dict):
                    usage = _chat_usage(reported)
                for choice in _dicts(chunk.get("choices")):
                    delta = choice.get("delta")
                    if isinstance(delta, dict):
                        content = delta.get("content")
                        if content and isinstance(content, str):
                            text.append(content)
                            yield content
                        if delta.get("refusal"):
                            refusal.append(str(delta["refusal"]))
                        for piece in _dicts(delta.get("tool_calls")):
                            index = piece.get("index")
                            if index is None:  # some compatible servers omit it for a single call
                                index = 0
                            elif type(index) is not int:
                                continue
                            partial = calls.setdefault(index, _PartialToolCall())
                            if piece.get("id"):
                                partial.call_id = str(piece["id"])
                            function = piece.get("function")
                            if isinstance(function, dict):
                                if function.get("name"):
                                    partial.name = str(function["name"])
                                if function.get("arguments"):
                                    partial.arguments.append(str(function["arguments"]))
                    if choice.get("finish_reason"):
                        finish_reason = str(choice["finish_reason"])
        except json.JSONDecodeError:
            raise malformed_stream(display_url(str(self._client.base_url)), self.name) from None
        except openai.OpenAIError as exc:
            raise self._translate(exc) from exc
        finally:
            await response.aclose()

        if refusal and not text:
            raise ModelError(f"model {self.name!r} refused to answer: {''.join(refusal)}")
        yield ModelResponse(
            text="".join(text),
            tool_calls=tuple(
                ModelToolCall(
                    # Some compatible servers omit ids; replaying the conversation needs one.
                    call_id=partial.call_id or f"call_{uuid.uuid4().hex[:12]}",
                    name=partial.name,
                    arguments="".join(partial.arguments),
                )
                for _, partial in sorted(calls.items())
            ),
            usage=usage,
            finish_reason=finish_reason,
        )

    def _translate(self, exc: openai.OpenAIError) -> AgentdError:
        return translate_openai_error(self._client, self.name, exc)


def translate_openai_error(client: openai.AsyncOpenAI, name: str, exc: openai.OpenAIError) -> AgentdError:
    """Map openai errors to agentd's: transient-after-retries vs. refused requests (both APIs).

    The messages reach the caller (``RunFailed``) and traces, so they never carry the
    endpoint's credentials or the API key: the endpoint is named without user info or
    query, upstream text is redacted, and an authentication failure's body is not
    forwarded at all (the server log has it, redacted).
    """
    endpoint = display_url(str(client.base_url))
    where = f"model endpoint {endpoint}"
    retries = f"gave up after {client.max_retries} retries"

    def scrub(text: str) -> str:
        """``text`` without the configured API key, the endpoint's password, or anything shaped like a credential."""
        return redact(text, (client.api_key, url_password(str(client.base_url))))

    refused = _connection_failure(exc)
    if isinstance(exc, openai.APITimeoutError) and refused is None:
        return ModelUnavailableError(f"{where} timed out for model {name!r}; {retries}")
    if isinstance(exc, openai.APIConnectionError):
        cause = scrub(str(refused or exc.__cause__ or exc))
        return ModelUnavailableError(f"{where} is unreachable ({cause}); {retries}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = scrub(_server_message(exc))
        log.warning(
            "model endpoint %s answered HTTP %s for model %r: %s", endpoint, status, name, message,
            extra={"model": name, "http_status": status},
        )
        if status in _AUTH_FAILURES:
            return ModelError(
                f"{where} rejected the request for model {name!r}: HTTP {status} ({_AUTH_FAILURES[status]})"
            )
        if len(message) > _MAX_UPSTREAM_MESSAGE:
            message = message[:_MAX_UPSTREAM_MESSAGE] + "…"
        if status == 429 or status >= 500:
            return ModelUnavailableError(f"{where} answered HTTP {status} for model {name!r}: {message}; {retries}")
        return ModelError(f"{where} rejected the request for model {name!r}: HTTP {status}: {message}")
    return ModelError(f"{where} failed for model {name!r}: {scrub(str(exc))}")


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The failed connect behind ``exc`` (refused, unresolvable host...), if that is what it was.

    The aiohttp transport reports every failed connect as a connect *timeout*; the cause
    chain still holds aiohttp's own error, which tells a refusal from a real timeout.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectorError) and not isinstance(cause, TimeoutError):
            return cause
        cause = cause.__cause__
    return None


def _server_message(exc: openai.APIStatusError) -> str:
    """The server's own error message rather than openai's "Error code: ..." wrapper."""
    if isinstance(exc.body, dict) and isinstance(exc.body.get("message"), str):
        return exc.body["message"]
    return exc.message


def default_api(base_url: str) -> str:
    """What "auto" means for an endpoint: the Responses API on OpenAI's own, else Chat Completions."""
    host = (urlsplit(base_url).hostname or "").lower()
    return "responses" if host == OPENAI_API_HOST else "chat_completions"


class OpenAIModel:
    """One model name on the provider's client, on either API: each request goes to the
    one its ``api`` names, else the provider's default."""

    def __init__(self, provider: "OpenAIProvider", name: str) -> None:
        self._provider = provider
        self.name = name

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        return self._provider.get_model(self.name, api=request.api or self._provider.api).stream(request)


class OpenAIProvider:
    """Models on both OpenAI APIs sharing ONE ``AsyncOpenAI`` client (one connection pool).

    ``api``: "responses", "chat_completions" or "auto" (the Responses API when the base URL
    is OpenAI's own, i.e. no ``base_url``/``OPENAI_BASE_URL`` or one on api.openai.com;
    Chat Completions for any other: vLLM, Ollama, LiteLLM...). An agent's ``model_api``
    overrides it for that agent's requests.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        api: str = "auto",
        max_connections: int = 1000,
    ) -> None:
        _redact_http_logs()
        if api != "auto" and api not in MODEL_APIS:
            raise ModelError(f"model API {api!r} is not one of auto, {', '.join(MODEL_APIS)}")
        # The openai client on its aiohttp transport: the same client (retries, timeouts,
        # auth, proxies from the environment), with an HTTP/1.1 pool that keeps every idle
        # connection and costs a fraction of the default transport's CPU per request and
        # per streamed chunk, which is what bounds a replica at a thousand concurrent runs
        # (bench/bench_scale.py). Every connection is kept alive up to ``max_connections``.
        # aiohttp refuses a URL with credentials beside the API key's Authorization header:
        # such an endpoint keeps the default transport.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        endpoint = urlsplit(base_url or os.environ.get("OPENAI_BASE_URL") or "")
        transport = openai.DefaultAsyncHttpxClient if endpoint.username or endpoint.password else openai.DefaultAioHttpClient
        http_client = transport(timeout=timeout_s, limits=limits)
        # None lets the openai library read OPENAI_API_KEY / OPENAI_BASE_URL itself.
        try:
            self._client = openai.AsyncOpenAI(
                api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries, http_client=http_client
            )
        except openai.OpenAIError as exc:
            raise ModelError(f"cannot configure the OpenAI client: {exc}") from exc
        # The resolved default: "responses" or "chat_completions".
        self.api = default_api(str(self._client.base_url)) if api == "auto" else api
        self._models: dict[tuple[str, str], Union[OpenAIChatModel, "OpenAIResponsesModel"]] = {}
        self._routed: dict[str, OpenAIModel] = {}

    def get_model(self, name: str, api: str | None = None) -> Any:
        """The model ``name``: on ``api`` when given ("responses" or "chat_completions"), else
        one that follows each request's ``api`` (the provider's default when it has none)."""
        if api is None:
            routed = self._routed.get(name)
            if routed is None:
                routed = self._routed[name] = OpenAIModel(self, name)
            return routed
        model = self._models.get((name, api))
        if model is None:
            if api == "responses":
                from agentd.server.models.openai_responses import OpenAIResponsesModel

                model = OpenAIResponsesModel(self._client, name)
            elif api == "chat_completions":
                model = OpenAIChatModel(self._client, name)
            else:
                raise ModelError(f"model API {api!r} is not one of {', '.join(MODEL_APIS)}")
            self._models[(name, api)] = model
        return model

    async def aclose(self) -> None:
        await self._client.close()
