"""A stdio MCP server for tests/test_mcp.py, written with the mcp package's MCPServer (FastMCP).

Run as ``python tests/mcp_servers/stdio_server.py``. ``block`` reports over a TCP connection to
``127.0.0.1:$AGENTD_TEST_SYNC_PORT`` (the test listens there): "started <pid>" once it runs,
then "cancelled" when the client cancels it, so the test synchronises on events, not sleeps.
"""

from __future__ import annotations

import json
import os
import socket

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("test-stdio", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def secret() -> str:
    """A tool the agents' filters keep out."""
    return "the secret"


@server.tool()
def pid() -> int:
    """This server's process id."""
    return os.getpid()


@server.tool()
async def whoami(ctx: Context) -> str:
    """The agentd identity the call's _meta carries."""
    meta = dict(ctx.request_context.meta or {})
    return json.dumps({k: v for k, v in meta.items() if k.startswith("agentd/")}, sort_keys=True)


@server.tool()
def fail(reason: str) -> str:
    """Fail with the reason."""
    raise ToolError(f"failed on purpose: {reason}")


@server.tool()
def big(size: int) -> str:
    """A result of ``size`` characters."""
    return "x" * size


@server.tool()
async def grow(ctx: Context) -> str:
    """Add the tool ``extra`` and tell the client its tool list changed."""

    @server.tool()
    def extra(word: str) -> str:
        """A tool added while running."""
        return f"extra: {word}"

    await ctx.session.send_tool_list_changed()
    return "grown"


def _report(text: str) -> None:
    with socket.create_connection(("127.0.0.1", int(os.environ["AGENTD_TEST_SYNC_PORT"]))) as conn:
        conn.sendall(text.encode() + b"\n")


@server.tool()
async def block() -> str:
    """Block until cancelled, reporting both to the test."""
    await anyio.to_thread.run_sync(_report, f"started {os.getpid()}")
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_report, "cancelled")
        raise
    return "never"


if __name__ == "__main__":
    server.run()
