"""Server-sent events from a model endpoint's raw streamed response, as JSON objects.

The openai client sends the request (retries, timeouts, authentication, base URL, error
statuses) and hands back the raw HTTP response (``post_streamed``); this module reads its
body. The client's own stream reader would build a ``ServerSentEvent`` and go through
several generator layers per event; at a thousand concurrent runs, with every chunk of a
paced answer arriving on its own, that was a large part of a replica's CPU
(bench/bench_scale.py). This reader splits lines in bulk and parses each event's data
once, with the same outcomes as the client's reader: ``[DONE]`` ends the stream (the rest
of the body is read so the connection can be reused), a JSON object with an ``error``
member raises ``openai.APIError``, a read timeout raises ``openai.APITimeoutError`` and a
broken connection ``openai.APIConnectionError``.

Lines end with LF or CRLF (what OpenAI-compatible servers send); ``event:`` names the
event, ``data:`` lines are joined with newlines, anything else (comments, ``id:``,
``retry:``) is ignored.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import httpx2 as httpx
import openai

DONE = "[DONE]"


async def json_events(response: httpx.Response) -> AsyncIterator[Any]:
    """The decoded ``data`` of each event in ``response``'s body, until ``[DONE]`` or its end.

    Raises ``json.JSONDecodeError`` for data that is not JSON, and the openai client's
    errors for an error event, a timeout or a broken connection. The caller closes the
    response (``finally: await response.aclose()``).
    """
    try:
        async for data in _event_data(response.aiter_bytes()):
            value = json.loads(data)
            if isinstance(value, dict) and value.get("error"):
                error = value["error"]
                message = error.get("message") if isinstance(error, dict) else None
                if not isinstance(message, str) or not message:
                    message = "An error occurred during streaming"
                raise openai.APIError(message=message, request=response.request, body=error)
            yield value
    except httpx.TimeoutException as exc:
        raise openai.APITimeoutError(request=response.request) from exc
    except httpx.TransportError as exc:
        raise openai.APIConnectionError(request=response.request) from exc


async def _event_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Each event's data (its ``data:`` lines joined), in order, until ``[DONE]``; events
    without data are skipped. After ``[DONE]`` the rest of the body is read (and dropped) so
    the connection can be reused."""
    pending = bytearray()
    scanned = 0  # pending[:scanned] holds no line end
    data: list[str] = []
    async for chunk in chunks:
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", scanned)) >= 0:
            line = pending[start:end]
            start = scanned = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:  # a blank line ends the event
                if data:
                    joined = "\n".join(data)
                    if joined.startswith(DONE):
                        async for _ in chunks:
                            pass
                        return
                    yield joined
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append((value[1:] if value.startswith(b" ") else value).decode(errors="replace"))
        if start:
            del pending[:start]
        scanned = len(pending)
    # A body that ends without its last blank line (or line end) still ends that event.
    if pending.startswith(b"data:"):
        value = pending[5:].rstrip(b"\r")
        data.append((value[1:] if value.startswith(b" ") else value).decode(errors="replace"))
    if data and not data[0].startswith(DONE):
        yield "\n".join(data)
