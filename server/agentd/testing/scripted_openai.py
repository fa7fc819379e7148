"""A scripted, OpenAI-compatible Chat Completions server for tests and demos.

It speaks enough of the wire protocol (SSE streaming and plain JSON) for the real
``openai.AsyncOpenAI`` client, so tests exercise the genuine HTTP path: retries,
timeouts, connection errors and stream parsing included. Turn selection, text chunking,
usage and call ids are the in-process ``ScriptedModel``'s, so both answer alike.
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
from agentd.server.models.script import Script, ScriptExhaustedError, ScriptedTurn, count_assistant_turns
from agentd.server.models.scripted import estimate_usage, new_call_id, text_chunks
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
        for tool_call in message.get("tool_calls") or ():
            total += len(tool_call.get("function", {}).get("arguments", ""))
    return total


def _pieces(arguments: str) -> list[str]:
    """Split call arguments into (at least two, when possible) streamed pieces."""
    size = max(1, (len(arguments) + 2) // 3)
    return [arguments[start : start + size] for start in range(0, len(arguments), size)]


def _usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


class ScriptedOpenAIServer:
    """Serves ``POST /v1/chat/completions`` and ``GET /v1/models`` from scripts.

    The request's ``model`` picks the script (else ``default``); the conversation in
    ``messages`` picks the turn, exactly as ``ScriptedModel`` does from items.
    """

    def __init__(
        self,
        scripts: Mapping[str, Script] | None = None,
        default: Script | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._scripts = dict(scripts or {})
        self._default = default
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._failures: deque[tuple[int, str | Callable[[Mapping[str, str]], str], float | None]] = deque()
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

    async def _answer(self, request: web.Request) -> web.StreamResponse:
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
        messages = body.get("messages") or []
        index = count_assistant_turns(chat_roles(messages))
        try:
            turn = script.turn(index)
        except ScriptExhaustedError as exc:
            return _error(400, f"scripted model {model!r}: {exc}", "script_exhausted")
        if turn.delay_s > 0:
            await asyncio.sleep(turn.delay_s)

        calls = [
            {
                "id": new_call_id(index, position),
                "type": "function",
                "function": {"name": tool_call.name, "arguments": tool_call.arguments_json},
            }
            for position, tool_call in enumerate(turn.tool_calls)
        ]
        usage = estimate_usage(_input_chars(messages), turn)
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
        for chunk in text_chunks(turn.text):
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
