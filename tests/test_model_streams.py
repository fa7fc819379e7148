"""How agentd reads a model endpoint's streamed body (``models/sse.py``), byte by byte.

A real HTTP server on loopback sends exactly the bytes each test gives it, in the pieces
given (each piece flushed on its own, so events and even lines arrive split across reads),
and the real ``openai`` client sends the requests. What a compatible server may send —
CRLF line ends, comments, multi-line data, events split anywhere, bytes after ``[DONE]``,
an error object, garbage — must give the right answer or a clear model error, never an
internal one, and must leave the connection reusable.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from agentd.server.models.base import ModelRequest, ModelResponse
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.runtime.errors import ModelError, ModelUnavailableError
from agentd.server.runtime.items import MessageItem


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": finish}]}


def sse(value: Any, line_end: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(value).encode() + line_end + line_end


class RawEndpoint:
    """Answers every POST with the next scripted body, written piece by piece."""

    def __init__(self) -> None:
        self.bodies: list[list[bytes]] = []
        self.peers: list[Any] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in self.bodies.pop(0):
            await response.write(piece)  # written (and flushed) on its own
        await response.write_eof()
        return response

    async def __aenter__(self) -> "RawEndpoint":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        app.router.add_post("/v1/responses", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def endpoint() -> AsyncIterator[RawEndpoint]:
    async with RawEndpoint() as raw:
        yield raw


@pytest.fixture
async def provider(endpoint: RawEndpoint) -> AsyncIterator[OpenAIProvider]:
    models = OpenAIProvider(api_key="test", base_url=endpoint.base_url, timeout_s=5.0, max_retries=0,
                            api="chat_completions")
    yield models
    await models.aclose()


async def answer(provider: OpenAIProvider) -> tuple[list[str], ModelResponse]:
    request = ModelRequest(model="m", instructions="", items=[MessageItem("user", "hi")])  # type: ignore[arg-type]
    deltas: list[str] = []
    final: list[ModelResponse] = []
    async for piece in provider.get_model("m").stream(request):
        (final if isinstance(piece, ModelResponse) else deltas).append(piece)  # type: ignore[arg-type]
    assert len(final) == 1
    return deltas, final[0]


def split_everywhere(body: bytes) -> list[bytes]:
    """The body in 3-byte pieces: lines and events split across reads."""
    return [body[i : i + 3] for i in range(0, len(body), 3)]


async def test_events_split_across_reads_with_crlf_comments_and_multiline_data(
    endpoint: RawEndpoint, provider: OpenAIProvider
) -> None:
    body = (
        b": a comment line, ignored\r\n\r\n"
        + sse(chunk({"role": "assistant", "content": "Hel"}), b"\r\n")
        + b"event: message\nid: 7\nretry: 10\n"
        + b'data: {"id": "c", "choices": [{"index": 0,\ndata:  "delta": {"content": "lo"}, "finish_reason": null}]}\n\n'
        + sse(chunk({"content": " wörld"}))
        + sse(chunk({}, "stop"))
        + sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
        + b"data: [DONE]\n\n"
    )
    endpoint.bodies.append(split_everywhere(body))
    deltas, response = await answer(provider)
    assert deltas == ["Hel", "lo", " wörld"]
    assert response.text == "Hello wörld" and response.finish_reason == "stop"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 3)


async def test_tool_calls_assemble_from_pieces_in_any_read_size(endpoint: RawEndpoint, provider: OpenAIProvider) -> None:
    announce = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    body = (
        sse(chunk({"tool_calls": [announce]}))
        + sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}))
        + sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}))
        + sse(chunk({}, "tool_calls"))
        + b"data: [DONE]\n\n"
    )
    endpoint.bodies.append([body])  # all in one read
    endpoint.bodies.append(split_everywhere(body))
    for _ in range(2):
        _, response = await answer(provider)
        assert [(c.call_id, c.name, c.arguments) for c in response.tool_calls] == [
            ("call_1", "get_weather", '{"city":"Paris"}')
        ]


async def test_the_connection_is_reused_after_done_even_with_bytes_after_it(
    endpoint: RawEndpoint, provider: OpenAIProvider
) -> None:
    for _ in range(3):
        endpoint.bodies.append([sse(chunk({"content": "ok"})), b"data: [DONE]\n\n", b": trailing comment\n\n"])
    for _ in range(3):
        deltas, _ = await answer(provider)
        assert deltas == ["ok"]
    assert len(set(endpoint.peers)) == 1, "each call should reuse the one keep-alive connection"


async def test_a_stream_ending_without_done_still_answers(endpoint: RawEndpoint, provider: OpenAIProvider) -> None:
    endpoint.bodies.append([sse(chunk({"content": "no done"})), b'data: {"choices": [{"index": 0, "delta": {}, '
                            b'"finish_reason": "stop"}]}'])  # no blank line, no [DONE]
    _, response = await answer(provider)
    assert response.text == "no done" and response.finish_reason == "stop"


async def test_an_error_event_is_a_model_error_with_its_message(endpoint: RawEndpoint, provider: OpenAIProvider) -> None:
    endpoint.bodies.append([sse(chunk({"content": "partial"})),
                            sse({"error": {"message": "The server had an error while processing", "type": "x"}})])
    with pytest.raises(ModelError, match="The server had an error while processing"):
        await answer(provider)


@pytest.mark.parametrize("garbage", [
    b"data: {not json\n\n",
    b"data: \xff\xfe\n\n",
    b'data: {"choices": "not a list", "usage": {"prompt_tokens": "many"}}\n\ndata: [1, 2]\n\n'
    b'data: {"choices": [{"delta": {"content": 42, "tool_calls": [{"index": "x", "function": "f"}]}}]}\n\n',
])
async def test_garbage_is_a_model_error_or_ignored_never_internal(
    endpoint: RawEndpoint, provider: OpenAIProvider, garbage: bytes
) -> None:
    endpoint.bodies.append([garbage, b"data: [DONE]\n\n"])
    try:
        _, response = await answer(provider)
    except ModelError as exc:
        assert "malformed stream chunk" in str(exc) and "not JSON" in str(exc)
    else:  # well-formed JSON of the wrong shape: the parts that make no sense are ignored
        assert response.text == "" and response.tool_calls == () and response.usage.input_tokens == 0


async def test_a_body_cut_mid_stream_is_unavailable(endpoint: RawEndpoint, provider: OpenAIProvider) -> None:
    """The endpoint dies after a partial line: the run may be retried later, it is not refused."""

    async def cut(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk({"content": "par"})) + b'data: {"choi')
        assert request.transport is not None
        request.transport.abort()  # the connection drops mid-body
        await asyncio.Event().wait()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", cut)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    models = OpenAIProvider(api_key="test", base_url=f"http://127.0.0.1:{runner.addresses[0][1]}/v1", timeout_s=5.0,
                            max_retries=0, api="chat_completions")
    try:
        with pytest.raises((ModelUnavailableError, ModelError)) as info:
            await answer(models)
        assert "127.0.0.1" in str(info.value)
    finally:
        await models.aclose()
        await runner.cleanup()


async def test_responses_api_garbage_is_ignored_never_internal(endpoint: RawEndpoint) -> None:
    """Events of the wrong shape on the Responses API: ignored, and the response still completes."""
    events = [
        {"type": "response.output_text.delta", "item_id": ["not", "a", "str"], "delta": 7},
        {"type": "response.output_item.added", "item": "not an object", "output_index": "first"},
        {"type": "response.function_call_arguments.delta", "output_index": None, "delta": {"x": 1}},
        {"type": "response.output_item.done", "item": {"type": "message", "id": 5, "content": "text"},
         "output_index": [0]},
        {"type": "response.output_item.done", "item": {"type": ["web_search_call"]}},
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Fine."},
        {"type": "response.completed", "response": {"usage": {"input_tokens": "lots", "output_tokens": 2,
                                                               "output_tokens_details": []}}},
    ]
    endpoint.bodies.append([b"event: x\n" + sse(event) for event in events])
    models = OpenAIProvider(api_key="test", base_url=endpoint.base_url, timeout_s=5.0, max_retries=0, api="responses")
    try:
        deltas, response = await answer(models)
    finally:
        await models.aclose()
    assert deltas == ["Fine."] and response.text == "Fine."
    assert (response.usage.input_tokens, response.usage.output_tokens) == (0, 2)
