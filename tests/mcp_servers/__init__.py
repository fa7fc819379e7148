"""MCP servers the MCP tests run agentd against (tests/test_mcp.py): a stdio server
(``stdio_server.py``, run as a subprocess) and a streamable HTTP server (``http_server.py``,
served in-process on a loopback port)."""
