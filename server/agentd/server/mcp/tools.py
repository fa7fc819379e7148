"""MCP tools as the agent's tools.

An agent's ``MCPToolset`` turns its servers' current tool lists into ``FunctionTool``s whose
``invoker`` forwards the call to the server: the run loop calls them, asks for approvals,
times them out and traces them like any function tool. The set is resolved per turn from
the connections' caches (a new snapshot only when a list changed), so a server that adds a
tool and says so (``notifications/tools/list_changed``) offers it from the next turn on.

Naming. A tool keeps the name its server gives it, made fit for a model (characters outside
``[A-Za-z0-9_-]`` become ``_``; a name over 64 characters is cut and given a hash suffix).
A name that collides — with the agent's own tools and handoffs, or with a tool of another of
its servers — is prefixed with its server's name (``{server}_{tool}``); one that still
collides is left out, with a warning.

Arguments are checked against the tool's JSON schema (``jsonschema``) before the call goes
out; invalid ones, JSON-RPC errors, an unreachable server and the tool's own error results
come back to the model as error outputs, and the run goes on. Results are the text of the
content blocks (other blocks are described, not sent), cut at the server's
``max_result_chars`` with a note. At most 128 tools go to the model in one request (OpenAI's
limit, handoffs and function tools included): MCP tools past that are left out, with a warning.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections import Counter
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict

from agentd.server.mcp.client import MCPServer, identity
from agentd.server.mcp.connection import MCPCallError, MCPUnavailableError
from agentd.server.models.base import ToolSpec
from agentd.server.redaction import redact
from agentd.server.runtime.context import ToolContext
from agentd.server.runtime.tools import FunctionTool, ToolResult, strict_schema_for
from agentd.server.tracing.base import MCP_SERVER, MCP_TOOL

log = logging.getLogger("agentd.mcp")

MAX_TOOLS_PER_REQUEST = 128
MAX_DESCRIPTION_CHARS = 4096
MAX_SCHEMA_BYTES = 64 * 1024  # a tool whose input schema is larger is left out
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="allow")


def model_tool_name(name: str) -> str:
    """``name`` made fit for a model: ``[A-Za-z0-9_-]{1,64}``."""
    clean = _INVALID_NAME_CHARS.sub("_", name) or "_"
    if len(clean) > 64:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        clean = f"{clean[:55]}_{digest}"
    return clean


def render_result(result: Any, max_chars: int) -> tuple[str, bool]:
    """A ``CallToolResult`` as the text the model reads, and whether the tool reported an error."""
    parts: list[str] = []
    for block in getattr(result, "content", None) or ():
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} ({getattr(block, 'mime_type', '') or 'unknown type'}), not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource link: {block.uri}]")
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            if isinstance(text, str):
                parts.append(text)
            else:
                parts.append(f"[resource {resource.uri} ({getattr(resource, 'mime_type', '') or 'binary'}), not shown]")
        else:
            parts.append(f"[{kind or 'unknown'} content, not shown]")
    structured = getattr(result, "structured_content", None)
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False, default=str))
    text = "\n".join(parts)
    if len(text) > max_chars:
        text = (
            text[:max_chars]
            + f"\n[truncated: the tool returned {len(text)} characters; only the first {max_chars} are shown]"
        )
    return text, bool(getattr(result, "is_error", False))


def _validator(schema: dict[str, Any]) -> Any:
    """A validator for the tool's input schema, or None when the schema itself is not valid
    (the arguments then go as they are, and the server judges them)."""
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
        return cls(schema)
    except Exception:  # noqa: BLE001 - a server's broken schema is its own business
        return None


def _problem(validator: Any, arguments: dict[str, Any]) -> str | None:
    import jsonschema

    try:
        errors = [error for _, error in zip(range(20), validator.iter_errors(arguments))]
    except RecursionError:
        return "the arguments nest too deeply"
    if not errors:
        return None
    first = jsonschema.exceptions.best_match(errors)
    assert first is not None
    where = first.json_path if first.json_path != "$" else "(arguments)"
    message = first.message if len(first.message) <= 300 else first.message[:300] + "..."
    return f"{where}: {message}"


def mcp_function_tool(server: MCPServer, tool: Any, exposed: str) -> FunctionTool:
    """The agent's tool for ``tool`` (an ``mcp.types.Tool`` of ``server``), named ``exposed``."""
    schema = dict(tool.input_schema or {}) or {"type": "object", "properties": {}}
    if schema.get("type") != "object":
        schema = {"type": "object", "properties": {}}
    parameters, strict = strict_schema_for(schema)
    description = tool.description or getattr(tool, "title", None) or ""
    if len(description) > MAX_DESCRIPTION_CHARS:
        description = description[:MAX_DESCRIPTION_CHARS] + "..."
    validator = _validator(schema)
    mcp_name = tool.name

    async def invoke(ctx: ToolContext, arguments: dict[str, Any]) -> ToolResult:
        if validator is not None:
            problem = _problem(validator, arguments)
            if problem is not None:
                summary = f"Error: invalid arguments for tool {exposed!r}"
                return ToolResult(f"{summary}: {problem}", True, summary)
        return await call_mcp_tool(server, mcp_name, exposed, ctx, arguments)

    def not_python(**_: Any) -> Any:
        raise RuntimeError(f"tool {exposed!r} is served by MCP server {server.name!r}")

    attributes = {MCP_SERVER: server.name}
    if mcp_name != exposed:
        attributes[MCP_TOOL] = mcp_name
    return FunctionTool(
        name=exposed,
        description=description,
        parameters=parameters,
        strict=strict,
        timeout_s=server.timeout_s,
        fn=not_python,
        args_model=_Arguments,
        takes_context=False,
        null_means_default=frozenset(),
        needs_approval=server.needs_approval(mcp_name),
        invoker=invoke,
        trace_attributes=attributes,
    )


async def call_mcp_tool(
    server: MCPServer, tool: str, exposed: str, ctx: ToolContext, arguments: dict[str, Any]
) -> ToolResult:
    """One call, its outcome as the model reads it; never raises for the server's problems."""
    meta = identity(ctx) if server.send_identity else None
    try:
        headers = server.call_headers(ctx)
    except Exception as exc:  # noqa: BLE001 - an app's header function
        failed = f"Error: tool {exposed!r} failed: the headers for MCP server {server.name!r} could not be made"
        log.warning("MCP server %r: context_headers failed: %s", server.name, exc)
        return ToolResult(failed, True, failed)
    try:
        result = await server.connection.call_tool(tool, arguments, meta=meta, headers=headers)
    except MCPUnavailableError as exc:
        summary = f"Error: MCP server {server.name!r} is unavailable"
        return ToolResult(f"{summary}: {redact(str(exc))}", True, summary)
    except MCPCallError as exc:
        summary = f"Error: MCP server {server.name!r} failed the call of tool {exposed!r}"
        return ToolResult(f"{summary}: {redact(str(exc))}", True, summary)
    text, is_error = render_result(result, server.max_result_chars)
    if is_error:
        summary = f"Error: tool {exposed!r} (MCP server {server.name!r}) reported an error"
        return ToolResult(f"Error: {text}" if text else summary, True, summary)
    return ToolResult(text, False)


class _Snapshot:
    __slots__ = ("tools", "specs")

    def __init__(self, tools: dict[str, FunctionTool], specs: tuple[ToolSpec, ...]) -> None:
        self.tools = tools
        self.specs = specs


class MCPToolset:
    """The MCP tools of one agent. ``reserved``: the names of its own tools and handoffs;
    ``room``: how many more tools one model request may take."""

    def __init__(self, agent: str, servers: Sequence[MCPServer], reserved: set[str], room: int) -> None:
        self.agent = agent
        self.servers = tuple(servers)
        self._reserved = frozenset(reserved)
        self._room = max(0, room)
        self._key: tuple[Any, ...] | None = None
        self._snapshot = _Snapshot({}, ())
        self._built: dict[tuple[Any, ...], FunctionTool] = {}

    async def load(self) -> None:
        """Read the lists that are stale or were never read (connecting if need be): at most the
        servers' connect timeout; a server that cannot answer keeps its last list (or none)."""
        stale = [s for s in self.servers if s.connection.tools_stale]
        if not stale:
            return
        results = await asyncio.gather(*(s.connection.fresh_tools() for s in stale), return_exceptions=True)
        for server, result in zip(stale, results):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                log.debug("agent %r: MCP server %r has no tool list now: %s", self.agent, server.name, result)

    async def specs(self) -> tuple[ToolSpec, ...]:
        await self.load()
        return self._current().specs

    def tool(self, name: str) -> FunctionTool | None:
        return self._current().tools.get(name)

    def tools(self) -> list[FunctionTool]:
        return list(self._current().tools.values())

    def _current(self) -> _Snapshot:
        key = tuple((id(s.connection), s.connection.tools_version) for s in self.servers)
        if key != self._key:
            self._snapshot = self._build()
            self._key = key
        return self._snapshot

    def _build(self) -> _Snapshot:
        entries: list[tuple[MCPServer, Any]] = []
        for server in self.servers:
            kept = []
            for tool in server.connection.tools or ():
                if not server.allows(tool):
                    continue
                if len(json.dumps(tool.input_schema or {}, default=str)) > MAX_SCHEMA_BYTES:
                    log.warning("MCP server %r: tool %r has an input schema over %d bytes; left out",
                                server.name, tool.name, MAX_SCHEMA_BYTES)
                    continue
                kept.append(tool)
            if len(kept) > server.max_tools:
                log.warning("agent %r: MCP server %r offers %d tools; only its first %d are used (max_tools)",
                            self.agent, server.name, len(kept), server.max_tools)
                kept = kept[: server.max_tools]
            entries.extend((server, tool) for tool in kept)
        counts = Counter(model_tool_name(tool.name) for _, tool in entries)
        tools: dict[str, FunctionTool] = {}
        built: dict[tuple[Any, ...], FunctionTool] = {}
        for server, tool in entries:
            exposed = model_tool_name(tool.name)
            if exposed in self._reserved or counts[exposed] > 1:
                exposed = model_tool_name(f"{server.name}_{tool.name}")
            if exposed in self._reserved or exposed in tools:
                log.warning("agent %r: MCP tool %r of server %r is left out: its name %r is taken",
                            self.agent, tool.name, server.name, exposed)
                continue
            if len(tools) >= self._room:
                log.warning("agent %r: more than %d tools in all; MCP tool %r of server %r and later ones are "
                            "left out", self.agent, MAX_TOOLS_PER_REQUEST, tool.name, server.name)
                break
            signature = (id(server), exposed, tool.name, tool.description,
                         json.dumps(tool.input_schema, sort_keys=True, default=str))
            function = self._built.get(signature) or mcp_function_tool(server, tool, exposed)
            built[signature] = function
            tools[exposed] = function
        self._built = built
        specs = tuple(ToolSpec(t.name, t.description, t.parameters, t.strict) for t in tools.values())
        return _Snapshot(tools, specs)
