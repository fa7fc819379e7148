"""MCP servers an agent takes tools from: a command run over stdio, or a streamable HTTP endpoint.

    from agentd.server.mcp import MCPServerStdio, MCPServerStreamableHttp, ToolFilter

    files = MCPServerStdio("files", "npx", ["-y", "@modelcontextprotocol/server-filesystem", "/srv/docs"])
    crm = MCPServerStreamableHttp(
        "crm", "https://crm.internal/mcp", headers={"Authorization": "Bearer …"},
        context_headers={"X-Tenant": "{tenant}", "X-User": "{subject}"},
        tool_filter=ToolFilter(allowed=["find_customer", "update_customer"]),
        require_approval=["update_customer"],
    )
    agent = Agent(name="support", mcp_servers=[files, crm])

Each server object owns one connection (``connection.MCPConnection``: one task opens it, serves
the calls and closes it; it reconnects with backoff when the server dies). Its tools become the
agent's tools (``mcp.tools``). Every call carries who is calling in the request's ``_meta``
(``agentd/run``, ``agentd/tenant``, ``agentd/subject``, ``agentd/agent``, ``agentd/session``,
``agentd/call``; ``send_identity=False`` leaves them out), and an HTTP server can also get them
as headers (``context_headers``), so the server can apply its own access rules.
"""

from __future__ import annotations

import contextlib
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Collection, Iterable, Literal, Mapping, Sequence, Union
from urllib.parse import quote, urlsplit

from agentd.server.mcp.connection import CURRENT_CALL, MCPConnection
from agentd.server.runtime.context import RunContext

SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
# Headers the MCP transport sets itself; neither ``headers`` nor ``context_headers`` may name them.
RESERVED_HEADERS = frozenset({"accept", "content-type", "content-length", "host", "last-event-id", "connection"})

# The run context values ``context_headers`` templates may use: "{tenant}", "{subject}"...
CONTEXT_FIELDS = ("run_id", "tenant", "subject", "agent", "session_id", "call_id")

# Defaults (and the bounds documented in the README).
DEFAULT_MAX_TOOLS = 128  # tools one server may add to an agent (after the filter)
DEFAULT_MAX_RESULT_CHARS = 50_000  # a longer result is cut, with a note saying so
DEFAULT_MAX_CONCURRENT_CALLS = 8  # calls in flight per server; more wait their turn
DEFAULT_CONNECT_TIMEOUT_S = 10.0

Approval = Union[Literal["always", "never"], Collection[str]]


class ToolFilter:
    """Which of a server's tools an agent gets, by the names the server gives them: only those in
    ``allowed`` (when given), never those in ``blocked``."""

    def __init__(self, allowed: Iterable[str] | None = None, blocked: Iterable[str] = ()) -> None:
        self.allowed = frozenset(allowed) if allowed is not None else None
        self.blocked = frozenset(blocked)

    def __call__(self, tool: Any) -> bool:
        name = tool.name
        return (self.allowed is None or name in self.allowed) and name not in self.blocked

    def __repr__(self) -> str:
        return f"ToolFilter(allowed={sorted(self.allowed) if self.allowed is not None else None}, blocked={sorted(self.blocked)})"


def identity(ctx: RunContext) -> dict[str, str]:
    """Who is calling, as the ``_meta`` of an MCP request carries it."""
    meta = {"agentd/run": ctx.run_id, "agentd/agent": ctx.agent_name, "agentd/tenant": ctx.tenant}
    if ctx.principal is not None and ctx.principal.subject:
        meta["agentd/subject"] = ctx.principal.subject
    if ctx.session_id:
        meta["agentd/session"] = ctx.session_id
    call_id = getattr(ctx, "call_id", "")
    if call_id:
        meta["agentd/call"] = call_id
    return meta


def _context_values(ctx: RunContext) -> dict[str, str]:
    return {
        "run_id": ctx.run_id,
        "tenant": ctx.tenant,
        "subject": ctx.principal.subject if ctx.principal is not None else "",
        "agent": ctx.agent_name,
        "session_id": ctx.session_id or "",
        "call_id": getattr(ctx, "call_id", ""),
    }


def check_header_name(name: str) -> None:
    if not HEADER_NAME_RE.match(name):
        raise ValueError(f"header name {name!r} is not a valid HTTP header name")
    lower = name.lower()
    if lower in RESERVED_HEADERS or lower.startswith("mcp-"):
        raise ValueError(f"header {name!r} is set by the MCP transport itself")


def check_header_value(name: str, value: str) -> None:
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name!r}: a value may not hold CR, LF or NUL")


def check_context_template(name: str, template: str) -> None:
    """A ``context_headers`` value: text with ``{field}`` placeholders from ``CONTEXT_FIELDS``."""
    check_header_value(name, template)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"header {name!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in CONTEXT_FIELDS or spec or conversion:
            raise ValueError(
                f"header {name!r}: {{{field}}} is not one of " + ", ".join("{" + f + "}" for f in CONTEXT_FIELDS)
            )


def _header_safe(value: str) -> str:
    """A value fit for a header: printable ASCII as is, anything else percent-encoded."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe="")


def render_context_headers(templates: Mapping[str, str], ctx: RunContext) -> dict[str, str]:
    values = {key: _header_safe(value) for key, value in _context_values(ctx).items()}
    return {name: template.format_map(values) for name, template in templates.items()}


class MCPServer:
    """An MCP server an agent takes tools from (``MCPServerStdio``, ``MCPServerStreamableHttp``).

    ``name`` names it in logs, traces (the ``mcp_server`` attribute of its tool spans) and
    error outputs, and prefixes its tools' names where they would collide with another
    server's or the agent's own (``{name}_{tool}``). Options:

    - ``tool_filter``: a ``ToolFilter`` or a function of the tool (an ``mcp.types.Tool``)
      returning whether the agent gets it.
    - ``require_approval``: "always", "never" (the default), or the names of the tools whose
      calls wait for the caller's ``ApproveToolCall``, like ``needs_approval`` function tools.
    - ``timeout_s``: how long a call may take (None: the server's ``AGENTD_TOOL_TIMEOUT_S``);
      a call that times out is cancelled on the MCP server and the model reads an error.
    - ``max_tools`` (128): the most tools the agent takes from this server, in its order;
      ``max_result_chars`` (50,000): a longer result is cut, with a note saying so;
      ``max_concurrent_calls`` (8): calls in flight at once, others wait their turn.
    - ``connect_timeout_s`` (10): opening a connection (and listing the tools) takes at most
      this long; ``max_reconnect_attempts`` (5): failed attempts in a row before the server is
      held down for 30 s; ``idle_timeout_s`` (None): close an unused session after this long.
    - ``send_identity`` (True): send the run's identity in each call's ``_meta``.
    """

    kind = ""

    def __init__(
        self,
        name: str,
        connection: MCPConnection,
        *,
        tool_filter: Callable[[Any], bool] | None = None,
        require_approval: Approval = "never",
        timeout_s: float | None = None,
        max_tools: int = DEFAULT_MAX_TOOLS,
        max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
        send_identity: bool = True,
    ) -> None:
        if not SERVER_NAME_RE.match(name):
            raise ValueError(f"MCP server name {name!r} must match {SERVER_NAME_RE.pattern}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"MCP server {name!r}: timeout_s must be > 0 or None")
        if max_tools < 1 or max_result_chars < 100:
            raise ValueError(f"MCP server {name!r}: max_tools must be >= 1 and max_result_chars >= 100")
        if isinstance(require_approval, str):
            if require_approval not in ("always", "never"):
                raise ValueError(f"MCP server {name!r}: require_approval is 'always', 'never' or a list of tool names")
            self._approval: bool | frozenset[str] = require_approval == "always"
        else:
            self._approval = frozenset(require_approval)
        self.name = name
        self.connection = connection
        self.tool_filter = tool_filter
        self.require_approval = require_approval
        self.timeout_s = timeout_s
        self.max_tools = max_tools
        self.max_result_chars = max_result_chars
        self.send_identity = send_identity

    # -- what the tools use --------------------------------------------------------------------

    def allows(self, tool: Any) -> bool:
        return self.tool_filter is None or bool(self.tool_filter(tool))

    def needs_approval(self, tool_name: str) -> bool:
        return self._approval if isinstance(self._approval, bool) else tool_name in self._approval

    def call_headers(self, ctx: RunContext) -> Mapping[str, str] | None:
        """Headers for one call's HTTP request (HTTP servers)."""
        return None

    # -- for apps and tests ----------------------------------------------------------------------

    async def list_tools(self, *, refresh: bool = False) -> list[Any]:
        """The server's tools this server object lets through its filter (``mcp.types.Tool``)."""
        tools = await (self.connection.refresh_tools() if refresh else self.connection.fresh_tools())
        return [tool for tool in tools if self.allows(tool)]

    async def refresh_tools(self) -> list[Any]:
        """List the server's tools again now (also done on its ``notifications/tools/list_changed``)."""
        return await self.list_tools(refresh=True)

    @property
    def generation(self) -> int:
        """How many sessions were opened so far (a reconnection opens a new one)."""
        return self.connection.generation

    async def wait_connected(self, after_generation: int = 0) -> int:
        return await self.connection.wait_connected(after_generation)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        await self.connection.aclose(timeout_s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class MCPServerStdio(MCPServer):
    """An MCP server run as a subprocess, spoken to over its stdin and stdout (its stderr goes to
    agentd's). The process gets ``env`` over a minimal environment (HOME, LOGNAME, PATH, SHELL,
    TERM, USER), never the rest of agentd's. It is started when the server is first needed and
    stopped at shutdown (stdin closed, then SIGTERM, then SIGKILL, each after 2 s)."""

    kind = "stdio"

    def __init__(
        self,
        name: str,
        command: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
        max_reconnect_attempts: int = 5,
        idle_timeout_s: float | None = None,
        connection: MCPConnection | None = None,
        **options: Any,
    ) -> None:
        if not command:
            raise ValueError(f"MCP server {name!r}: command is empty")
        self.command = command
        self.args = tuple(args)
        self.env = dict(env or {})
        self.cwd = str(cwd) if cwd is not None else None
        if connection is None:
            connection = MCPConnection(
                name, stdio_transport(command, self.args, self.env, self.cwd),
                connect_timeout_s=connect_timeout_s, max_concurrent_calls=max_concurrent_calls,
                max_reconnect_attempts=max_reconnect_attempts, idle_timeout_s=idle_timeout_s,
                client_version=_agentd_version(),
            )
        super().__init__(name, connection, **options)


class MCPServerStreamableHttp(MCPServer):
    """An MCP server at a streamable HTTP endpoint. ``headers`` go with every request;
    ``context_headers`` with each tool call's request, rendered from the run context:
    ``{run_id}``, ``{tenant}``, ``{subject}``, ``{agent}``, ``{session_id}``, ``{call_id}``
    (values that are not printable ASCII are percent-encoded), or a function of the
    ``ToolContext`` returning the headers."""

    kind = "streamable_http"

    def __init__(
        self,
        name: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        context_headers: Mapping[str, str] | Callable[[RunContext], Mapping[str, str]] | None = None,
        http_timeout_s: float = 30.0,
        sse_read_timeout_s: float = 300.0,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
        max_reconnect_attempts: int = 5,
        idle_timeout_s: float | None = None,
        connection: MCPConnection | None = None,
        **options: Any,
    ) -> None:
        check_url(url)
        self.url = url
        self.headers = dict(headers or {})
        for key, value in self.headers.items():
            check_header_name(key)
            check_header_value(key, value)
        if context_headers is not None and not callable(context_headers):
            context_headers = dict(context_headers)
            for key, value in context_headers.items():
                check_header_name(key)
                check_context_template(key, value)
        self.context_headers = context_headers
        if connection is None:
            connection = MCPConnection(
                name, http_transport(url, self.headers, http_timeout_s, sse_read_timeout_s),
                connect_timeout_s=connect_timeout_s, max_concurrent_calls=max_concurrent_calls,
                max_reconnect_attempts=max_reconnect_attempts, idle_timeout_s=idle_timeout_s,
                client_version=_agentd_version(),
            )
        super().__init__(name, connection, **options)

    def call_headers(self, ctx: RunContext) -> Mapping[str, str] | None:
        if self.context_headers is None:
            return None
        if callable(self.context_headers):
            headers = dict(self.context_headers(ctx))
            for key, value in headers.items():
                check_header_name(key)
                check_header_value(key, value)
            return headers
        return render_context_headers(self.context_headers, ctx)


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"MCP server URL {url!r} must be an http:// or https:// URL with a host")


def stdio_transport(
    command: str, args: Sequence[str], env: Mapping[str, str], cwd: str | None
) -> Callable[[], contextlib.AbstractAsyncContextManager[tuple[Any, Any]]]:
    @contextlib.asynccontextmanager
    async def open_stdio() -> AsyncIterator[tuple[Any, Any]]:
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=command, args=list(args), env=dict(env) or None, cwd=cwd)
        async with stdio_client(params, errlog=_errlog()) as streams:
            yield streams

    return open_stdio


def http_transport(
    url: str, headers: Mapping[str, str], timeout_s: float, sse_read_timeout_s: float
) -> Callable[[], contextlib.AbstractAsyncContextManager[tuple[Any, Any]]]:
    @contextlib.asynccontextmanager
    async def open_http() -> AsyncIterator[tuple[Any, Any]]:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        client = httpx2.AsyncClient(
            headers=dict(headers),
            timeout=httpx2.Timeout(timeout_s, read=max(sse_read_timeout_s, timeout_s)),
            event_hooks={"request": [_add_call_headers], "response": [_note_unknown_session]},
        )
        async with client:
            async with streamable_http_client(url, http_client=client) as streams:
                yield streams

    return open_http


async def _add_call_headers(request: Any) -> None:
    """The tool call's own headers (``context_headers``), on the HTTP request that carries it."""
    call = CURRENT_CALL.get()
    if call is not None and call.headers:
        for key, value in call.headers.items():
            request.headers[key] = value


async def _note_unknown_session(response: Any) -> None:
    """A 404 to a request with a session id: the server does not know the session (it restarted
    or expired it) and ran nothing; the connection opens a new session and sends it again."""
    call = CURRENT_CALL.get()
    if call is not None and response.status_code == 404 and "mcp-session-id" in response.request.headers:
        call.session_gone = True


def _errlog() -> Any:
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL
    return sys.stderr


def _agentd_version() -> str:
    try:
        from importlib.metadata import version

        return version("agentd")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0"
