"""A scripted, OpenAI-compatible Chat Completions and Responses server for tests and demos.

It speaks enough of the wire protocols (SSE streaming and plain JSON) for the real
``openai.AsyncOpenAI`` client, so tests exercise the genuine HTTP path: retries,
timeouts, connection errors and stream parsing included. Turn selection, text chunking,
usage and call ids are the in-process ``ScriptedModel``'s, so both answer alike.

``POST /v1/responses`` streams the Responses API's events as OpenAI sends them (``event:``
and ``data:`` lines, ``sequence_number`` from 0): the turn's reasoning items (summary
deltas; ``encrypted_content`` when the request includes ``reasoning.encrypted_content``) and
hosted tool calls first, then its message, then its function calls, then
``response.completed`` with the usage (reasoning tokens included).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from types import TracebackType
from typing import Any, Callable, Mapping

from aiohttp import web

from agentd.server.models.chat_format import chat_roles
from agentd.server.models.responses_format import input_chars, responses_roles
from agentd.server.models.script import (
    Script,
    ScriptedHostedCall,
    ScriptedReasoning,
    ScriptExhaustedError,
    ScriptedTurn,
    count_assistant_turns,
)
from agentd.server.models.scripted import (
    encrypted_reasoning,
    estimate_usage,
    hosted_call_id,
    hosted_output_item,
    new_call_id,
    reasoning_id,
    text_chunks,
)
from agentd.server.runtime.usage import Usage

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def _error(status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    """An error answer shaped like OpenAI's, which the openai client parses into its exceptions."""
    kind = "server_error" if status >= 500 else _ERROR_TYPES.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _input_chars(messages: list[dict[str, Any]]) -> int:
    """Request size as ``ScriptedModel`` counts it: all texts, call arguments and outputs."""
    total = 0
    for message in messages:
        if isinstance(message.get("content"), str):
            total += len(message["content"])
        elif isinstance(message.get("content"), list):
            total += sum(len(part.get("text", "")) for part in message["content"] if isinstance(part, dict))
        for tool_call in message.get("tool_calls") or ():
            total += len(tool_call.get("function", {}).get("arguments", ""))
    return total


def _pieces(arguments: str) -> list[str]:
    """Split call arguments into (at least two, when possible) streamed pieces."""
    size = max(1, (len(arguments) + 2) // 3)
    return [arguments[start : start + size] for start in range(0, len(arguments), size)]


def _usage_json(usage: Usage) -> dict[str, Any]:
    data: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.reasoning_tokens:
        data["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    if usage.cached_input_tokens:
        data["prompt_tokens_details"] = {"cached_tokens": usage.cached_input_tokens}
    return data


def _responses_usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_input_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


class ScriptedOpenAIServer:
    """Serves ``POST /v1/chat/completions``, ``POST /v1/responses`` and ``GET /v1/models`` from scripts.

    The request's ``model`` picks the script (else ``default``); the conversation in
    ``messages`` (chat) or ``input`` (responses) picks the turn, exactly as ``ScriptedModel``
    does from items. ``requests`` records every request body of both APIs, in order.

    ``cached_input_tokens``: how many of each answer's input tokens it reports as read from a
    prompt cache (at most all of them; 0 by default), so cached pricing can be tested; set it
    at construction or on the instance between runs.
    """

    def __init__(
        self,
        scripts: Mapping[str, Script] | None = None,
        default: Script | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cached_input_tokens: int = 0,
    ) -> None:
        self._scripts = dict(scripts or {})
        self.cached_input_tokens = cached_input_tokens
        self._default = default
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._failures: deque[tuple[int, str | Callable[[Mapping[str, str]], str], float | None]] = deque()
        self._response_failures: deque[tuple[str, str]] = deque()
        self.requests: list[dict[str, Any]] = []
        self.active_requests = 0

    # -- test hooks --------------------------------------------------------------

    def fail_next(
        self,
        count: int,
        status: int = 500,
        message: str | Callable[[Mapping[str, str]], str] = "scripted failure",
        *,
        retry_after_s: float | None = None,
    ) -> None:
        """Answer the next ``count`` completion requests with HTTP ``status``.

        ``message`` is the error body's message, or a function of the request's headers
        giving it (a server that echoes them back, e.g. its ``Authorization``).
        ``retry_after_s`` sends ``retry-after-ms``, which the openai client honours
        instead of its ~0.5 s+ exponential backoff: it keeps retry tests fast.
        """
        self._failures.extend([(status, message, retry_after_s)] * count)

    def fail_responses_next(self, count: int, code: str = "server_error", message: str = "scripted failure") -> None:
        """Fail the next ``count`` streamed ``/v1/responses`` answers mid-stream: HTTP 200, then
        ``response.failed`` with this error ``code`` (how the Responses API reports a failure
        once it started answering)."""
        self._response_failures.extend([(code, message)] * count)

    def set_script(self, name: str, script: Script) -> None:
        self._scripts[name] = script

    # -- lifecycle ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._runner is None:
            raise RuntimeError("the scripted OpenAI server is not started")
        return f"http://{self._host}:{self._port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client that disconnects (a cancelled run) cancels
        # its handler instead of leaving it sleeping through a scripted delay.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> "ScriptedOpenAIServer":
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- handlers ----------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "agentd"} for name in self._scripts]
        return web.json_response({"object": "list", "data": data})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.active_requests += 1
        try:
            return await self._answer(request)
        finally:
            self.active_requests -= 1

    async def _turn(
        self, request: web.Request, roles: Callable[[dict[str, Any]], list[str]]
    ) -> tuple[dict[str, Any], int, ScriptedTurn] | web.Response:
        """The request's body, turn index and scripted turn (after its delay), or the error answer."""
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "the request body is not valid JSON")
        self.requests.append(body)
        if self._failures:
            status, message, retry_after_s = self._failures.popleft()
            headers = {"retry-after-ms": str(int(retry_after_s * 1000))} if retry_after_s is not None else None
            text = message if isinstance(message, str) else message(request.headers)
            return _error(status, text, headers=headers)

        model = body.get("model", "")
        script = self._scripts.get(model, self._default)
        if script is None:
            known = ", ".join(sorted(self._scripts)) or "none"
            return _error(404, f"The model {model!r} does not exist (scripted models: {known})", "model_not_found")
        index = count_assistant_turns(roles(body))
        try:
            turn = script.turn(index)
        except ScriptExhaustedError as exc:
            return _error(400, f"scripted model {model!r}: {exc}", "script_exhausted")
        if turn.delay_s > 0:
            await asyncio.sleep(turn.delay_s)
        return body, index, turn

    def _cached(self, usage: Usage) -> Usage:
        usage.cached_input_tokens = min(max(self.cached_input_tokens, 0), usage.input_tokens)
        return usage

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        found = await self._turn(request, lambda body: chat_roles(body.get("messages") or []))
        if isinstance(found, web.StreamResponse):
            return found
        body, index, turn = found
        model = body.get("model", "")
        messages = body.get("messages") or []

        calls = [
            {
                "id": new_call_id(index, position),
                "type": "function",
                "function": {"name": tool_call.name, "arguments": tool_call.arguments_json},
            }
            for position, tool_call in enumerate(turn.tool_calls)
        ]
        usage = self._cached(estimate_usage(_input_chars(messages), turn))
        finish_reason = "tool_calls" if calls else "stop"
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, head, turn, calls, finish_reason, usage if include_usage else None)
        message: dict[str, Any] = {"role": "assistant", "content": turn.text or None, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        return web.json_response(
            {**head, "object": "chat.completion", "choices": [choice], "usage": _usage_json(usage)}
        )

    async def _stream(
        self,
        request: web.Request,
        head: dict[str, Any],
        turn: ScriptedTurn,
        calls: list[dict[str, Any]],
        finish_reason: str,
        usage: Usage | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        head = {**head, "object": "chat.completion.chunk"}

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            await response.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        for position, chunk in enumerate(text_chunks(turn.text)):
            if position and turn.chunk_delay_s > 0:
                await asyncio.sleep(turn.chunk_delay_s)
            await send({"content": chunk})
        for position, call in enumerate(calls):
            announce = {**call, "index": position, "function": {"name": call["function"]["name"], "arguments": ""}}
            await send({"tool_calls": [announce]})
        # Argument pieces of concurrent calls interleave, so clients must assemble by index.
        pieces = [_pieces(call["function"]["arguments"]) for call in calls]
        for step in range(max((len(split) for split in pieces), default=0)):
            for position, split in enumerate(pieces):
                if step < len(split):
                    await send({"tool_calls": [{"index": position, "function": {"arguments": split[step]}}]})
        await send({}, finish_reason)
        if usage is not None:
            await response.write(f"data: {json.dumps({**head, 'choices': [], 'usage': _usage_json(usage)})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- the Responses API ---------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        self.active_requests += 1
        try:
            return await self._answer_responses(request)
        finally:
            self.active_requests -= 1

    async def _answer_responses(self, request: web.Request) -> web.StreamResponse:
        found = await self._turn(request, lambda body: responses_roles(_input_list(body)))
        if isinstance(found, web.StreamResponse):
            return found
        body, index, turn = found
        model = body.get("model", "")
        encrypted = "reasoning.encrypted_content" in (body.get("include") or ())
        output = _output_items(index, turn, encrypted)
        instructions = body.get("instructions")
        usage = self._cached(estimate_usage(
            (len(instructions) if isinstance(instructions, str) else 0) + input_chars(_input_list(body)), turn
        ))
        head: dict[str, Any] = {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": "in_progress",
            "output": [],
            "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "instructions": body.get("instructions"),
            "store": bool(body.get("store", True)),
            "usage": None,
            "error": None,
            "incomplete_details": None,
        }
        done = {**head, "status": "completed", "output": output, "usage": _responses_usage_json(usage)}
        if not body.get("stream"):
            return web.json_response(done)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        sequence = 0

        async def send(kind: str, **data: Any) -> None:
            nonlocal sequence
            payload = {"type": kind, "sequence_number": sequence, **data}
            sequence += 1
            await response.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())

        await send("response.created", response=head)
        await send("response.in_progress", response=head)
        if self._response_failures:
            code, message = self._response_failures.popleft()
            failed = {**head, "status": "failed", "error": {"code": code, "message": message}}
            await send("response.failed", response=failed)
            await response.write_eof()
            return response
        for position, item in enumerate(output):
            await _stream_item(send, position, item, turn.chunk_delay_s)
        await send("response.completed", response=done)
        await response.write_eof()
        return response


def _input_list(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of items (a bare string is one user message)."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return [item for item in value or () if isinstance(item, dict)]


def _output_items(index: int, turn: ScriptedTurn, encrypted: bool) -> list[dict[str, Any]]:
    """The turn's output items, as ``response.completed`` lists them: reasoning and hosted
    calls in the script's order, then the message, then the function calls."""
    items: list[dict[str, Any]] = []
    for position, step in enumerate(turn.steps):
        if isinstance(step, ScriptedReasoning):
            reasoning: dict[str, Any] = {
                "id": reasoning_id(index, position),
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": part} for part in step.summary],
            }
            if encrypted:
                reasoning["encrypted_content"] = encrypted_reasoning(step.summary)
            items.append(reasoning)
        else:
            assert isinstance(step, ScriptedHostedCall)
            items.append(hosted_output_item(step, hosted_call_id(step.tool, index, position)))
    if turn.text:
        items.append({
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": turn.text, "annotations": [], "logprobs": []}],
        })
    for position, tool_call in enumerate(turn.tool_calls):
        items.append({
            "id": f"fc_{uuid.uuid4().hex}",
            "type": "function_call",
            "call_id": new_call_id(index, position),
            "name": tool_call.name,
            "arguments": tool_call.arguments_json,
            "status": "completed",
        })
    return items


_HOSTED_PROGRESS = {
    "web_search_call": ("response.web_search_call.in_progress", "response.web_search_call.searching",
                        "response.web_search_call.completed"),
    "file_search_call": ("response.file_search_call.in_progress", "response.file_search_call.searching",
                         "response.file_search_call.completed"),
    "code_interpreter_call": ("response.code_interpreter_call.in_progress",
                              "response.code_interpreter_call.interpreting",
                              "response.code_interpreter_call.completed"),
    "image_generation_call": ("response.image_generation_call.in_progress",
                              "response.image_generation_call.generating",
                              "response.image_generation_call.completed"),
}


async def _stream_item(send: Callable[..., Any], position: int, item: dict[str, Any], chunk_delay_s: float) -> None:
    """One output item's events, from ``response.output_item.added`` to ``.done``; a
    message's text deltas ``chunk_delay_s`` apart."""
    kind = item["type"]
    if kind == "message":
        text = item["content"][0]["text"]
        await send("response.output_item.added", output_index=position,
                   item={**item, "status": "in_progress", "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        await send("response.content_part.added", item_id=item["id"], output_index=position, content_index=0,
                   part=part)
        for index, chunk in enumerate(text_chunks(text)):
            if index and chunk_delay_s > 0:
                await asyncio.sleep(chunk_delay_s)
            await send("response.output_text.delta", item_id=item["id"], output_index=position, content_index=0,
                       delta=chunk, logprobs=[])
        await send("response.output_text.done", item_id=item["id"], output_index=position, content_index=0,
                   text=text, logprobs=[])
        await send("response.content_part.done", item_id=item["id"], output_index=position, content_index=0,
                   part={**part, "text": text})
    elif kind == "reasoning":
        await send("response.output_item.added", output_index=position,
                   item={"id": item["id"], "type": "reasoning", "summary": []})
        for summary_index, part in enumerate(item["summary"]):
            empty = {"type": "summary_text", "text": ""}
            await send("response.reasoning_summary_part.added", item_id=item["id"], output_index=position,
                       summary_index=summary_index, part=empty)
            for chunk in text_chunks(part["text"]):
                await send("response.reasoning_summary_text.delta", item_id=item["id"], output_index=position,
                           summary_index=summary_index, delta=chunk)
            await send("response.reasoning_summary_text.done", item_id=item["id"], output_index=position,
                       summary_index=summary_index, text=part["text"])
            await send("response.reasoning_summary_part.done", item_id=item["id"], output_index=position,
                       summary_index=summary_index, part=part)
    elif kind == "function_call":
        await send("response.output_item.added", output_index=position,
                   item={**item, "arguments": "", "status": "in_progress"})
        for piece in _pieces(item["arguments"]):
            await send("response.function_call_arguments.delta", item_id=item["id"], output_index=position,
                       delta=piece)
        await send("response.function_call_arguments.done", item_id=item["id"], output_index=position,
                   name=item["name"], arguments=item["arguments"])
    else:
        started, working, finished = _HOSTED_PROGRESS[kind]
        await send("response.output_item.added", output_index=position, item={**item, "status": "in_progress"})
        await send(started, item_id=item["id"], output_index=position)
        await send(working, item_id=item["id"], output_index=position)
        await send(finished, item_id=item["id"], output_index=position)
    await send("response.output_item.done", output_index=position, item=item)
