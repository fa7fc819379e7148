"""Tools from MCP servers: ``Agent(mcp_servers=[MCPServerStdio(...), MCPServerStreamableHttp(...)])``.

``client`` has the server objects, ``connection`` the one-task-per-connection client,
``tools`` the agent's MCP tools as function tools, ``registry`` the servers of declarative
agents and shutdown. The ``mcp`` package itself is imported on first use.
"""

from agentd.server.mcp.client import (
    MCPServer,
    MCPServerStdio,
    MCPServerStreamableHttp,
    ToolFilter,
)
from agentd.server.mcp.connection import MCPCallError, MCPUnavailableError

__all__ = [
    "MCPCallError",
    "MCPServer",
    "MCPServerStdio",
    "MCPServerStreamableHttp",
    "MCPUnavailableError",
    "ToolFilter",
]
