"""A streamable HTTP MCP server for tests/test_mcp.py, on the mcp package's low-level ``Server``,
served in-process by uvicorn on a loopback port.

The test drives it and reads what it saw through the object: ``tools`` (mutable, with
``notify=True`` on ``grow`` it tells the client on the request's own stream, in order with the
response), ``calls`` (every tool call with its arguments, ``_meta`` and HTTP headers), and
events for ``block``: ``block_started``, ``block_cancelled``. ``stop``/``start`` take it down
and bring it back on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass, field
from typing import Any

import mcp.types as types
import uvicorn
from mcp.server.lowlevel.server import Server


@dataclass
class SeenCall:
    name: str
    arguments: dict[str, Any]
    meta: dict[str, Any]
    headers: dict[str, str]


def _tool(name: str, description: str, properties: dict[str, Any] | None = None, required: list[str] | None = None) -> types.Tool:
    return types.Tool(
        name=name,
        description=description,
        input_schema={"type": "object", "properties": properties or {}, "required": required or []},
    )


def _text(text: str, *, error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=error)


@dataclass(eq=False)
class HttpMCPServer:
    port: int = 0
    tools: dict[str, types.Tool] = field(default_factory=dict)
    calls: list[SeenCall] = field(default_factory=list)
    lists: int = 0

    def __post_init__(self) -> None:
        self.tools = {
            t.name: t
            for t in (
                _tool("add", "Add two integers.", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
                _tool("lookup", "Look a customer up.", {"id": {"type": "string"}}, ["id"]),
                _tool("whoami", "The identity the call carries."),
                _tool("grow", "Add the tool 'fresh' and tell the client."),
                _tool("block", "Block until cancelled."),
                _tool("delete_all", "Delete everything (needs approval)."),
            )
        }
        self.block_started = asyncio.Event()
        self.block_cancelled = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def _app(self) -> Any:
        mcp = Server("test-http", on_list_tools=self._list_tools, on_call_tool=self._call_tool)
        return mcp.streamable_http_app()

    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        self.lists += 1
        return types.ListToolsResult(tools=list(self.tools.values()))

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        request = getattr(ctx, "request", None)
        headers = {k.lower(): v for k, v in getattr(request, "headers", {}).items()} if request is not None else {}
        arguments = dict(params.arguments or {})
        self.calls.append(SeenCall(params.name, arguments, dict(ctx.meta or {}), headers))
        if params.name not in self.tools:
            return _text(f"Unknown tool: {params.name}", error=True)
        if params.name == "add":
            return _text(str(arguments["a"] + arguments["b"]))
        if params.name == "lookup":
            return _text(json.dumps({"id": arguments["id"], "name": "Ada"}))
        if params.name == "whoami":
            meta = {k: v for k, v in (ctx.meta or {}).items() if k.startswith("agentd/")}
            return _text(json.dumps(meta, sort_keys=True))
        if params.name == "grow":
            self.tools["fresh"] = _tool("fresh", "A tool added while running.")
            await ctx.session.send_notification(types.ToolListChangedNotification(), related_request_id=ctx.request_id)
            return _text("grown")
        if params.name == "fresh":
            return _text("fresh!")
        if params.name == "block":
            self.block_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.block_cancelled.set()
                raise
        if params.name == "delete_all":
            return _text("deleted everything")
        return _text("?", error=True)

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # not the test's signals
        started = asyncio.Event()
        original = self._server.startup

        async def startup(sockets: Any = None) -> None:
            await original(sockets=sockets)
            started.set()

        self._server.startup = startup  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        done, _ = await asyncio.wait({self._task, asyncio.ensure_future(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            self._task.result()

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None

    async def __aenter__(self) -> "HttpMCPServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()
