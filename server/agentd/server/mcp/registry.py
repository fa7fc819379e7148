"""The MCP servers of one agentd server, for warming up and closing them.

Code agents bring their own server objects (``Agent(mcp_servers=[...])``). Declarative agents
(files, the API) get theirs here (``server_for``): built from their definition, sharing one
connection per (owner, transport) — every version of an API agent, and every agent of a tenant
naming the same endpoint with the same headers, use one session — while the options that are
the agent's own (name, tool filter, approvals, limits) stay per agent. ``owner`` keeps tenants
apart: an API agent's connections belong to its tenant and are never shared with another's
(an MCP server may keep state per session). Shared connections close after
``IDLE_TIMEOUT_S`` unused and open again on demand, so agents nobody runs hold no sessions.

``aclose`` closes every session at shutdown, each by the task that opened it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

from agentd.server.mcp.client import MCPServer, MCPServerStdio, MCPServerStreamableHttp, ToolFilter
from agentd.server.mcp.connection import MCPConnection

log = logging.getLogger("agentd.mcp")

IDLE_TIMEOUT_S = 300.0
# Shutdown gives the sessions the grace period, but at least this long, to close in order.
MIN_CLOSE_S = 2.0


class MCPRegistry:
    def __init__(self, servers: Iterable[MCPServer] = ()) -> None:
        self._code: dict[int, MCPServer] = {}
        self._connections: dict[tuple[Any, ...], MCPConnection] = {}
        for server in servers:
            self._code.setdefault(id(server), server)

    @property
    def connections(self) -> list[MCPConnection]:
        seen: dict[int, MCPConnection] = {}
        for server in self._code.values():
            seen.setdefault(id(server.connection), server.connection)
        for connection in self._connections.values():
            seen.setdefault(id(connection), connection)
        return list(seen.values())

    def server_for(self, spec: Any, owner: str) -> MCPServer:
        """A server object for a definition's ``mcp_servers`` entry (``agents.definition``)."""
        return server_from_definition(spec, self._connection, owner)

    def _connection(self, key: tuple[Any, ...], make: Any) -> MCPConnection:
        connection = self._connections.get(key)
        if connection is None:
            connection = self._connections[key] = make()
        return connection

    def warm_up(self) -> None:
        """Connect the app module's servers in the background (their problems show in the log at
        startup, and their tools are listed before the first run needs them)."""
        for server in self._code.values():
            server.connection.warm_up()

    async def aclose(self, grace_s: float) -> None:
        """Close every open session, concurrently, each within ``max(grace_s, MIN_CLOSE_S)``."""
        live = [c for c in self.connections if c.owner is not None and not c.owner.done()]
        if not live:
            return
        timeout = max(grace_s, MIN_CLOSE_S)
        await asyncio.gather(*(c.aclose(timeout) for c in live), return_exceptions=True)
        log.info("closed %d MCP session(s)", len(live))


def server_from_definition(spec: Any, connection_for: Any = None, owner: str = "") -> MCPServer:
    """The ``MCPServer`` an ``MCPServerDefinition`` describes. ``connection_for(key, make)``
    returns a shared connection (``MCPRegistry``); without it the server has its own."""
    allow = spec.tool_filter.allow
    tool_filter = ToolFilter(allow, spec.tool_filter.deny) if allow is not None or spec.tool_filter.deny else None
    approval = spec.require_approval if isinstance(spec.require_approval, str) else list(spec.require_approval)
    options: dict[str, Any] = dict(
        tool_filter=tool_filter, require_approval=approval, timeout_s=spec.timeout_s,
        max_result_chars=spec.max_result_chars, max_tools=spec.max_tools,
    )
    if spec.type == "stdio":
        template = MCPServerStdio(spec.name, spec.command, spec.args, spec.env, spec.cwd, **options)
        key: tuple[Any, ...] = ("stdio", owner, spec.command, tuple(spec.args), tuple(sorted(spec.env.items())),
                                spec.cwd)
    else:
        template = MCPServerStreamableHttp(
            spec.name, spec.url, spec.headers, context_headers=spec.context_headers or None, **options
        )
        key = ("http", owner, spec.url, tuple(sorted(spec.headers.items())))
    if connection_for is None:
        return template

    def make() -> MCPConnection:
        connection = template.connection
        connection.idle_timeout_s = IDLE_TIMEOUT_S
        return connection

    shared = connection_for(key, make)
    template.connection = shared
    return template
