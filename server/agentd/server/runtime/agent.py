"""Agents: instructions, a model, tools, handoffs and an optional structured output."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

from pydantic import BaseModel

from agentd.server.models.base import MODEL_APIS, ModelSettings, OutputSchema, ToolSpec, hosted_tool_problem
from agentd.server.runtime.context import RunContext
from agentd.server.runtime.guardrails import Guardrail, InputGuardrailMode, resolve_guardrails
from agentd.server.runtime.history import Compaction
from agentd.server.runtime.tools import FunctionTool, strict_json_schema, strict_schema_for

AGENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

Instructions = Union[str, Callable[[RunContext, "Agent"], Union[str, Awaitable[str]]]]

# The longest a result-cache entry may live.
MAX_RESULT_CACHE_TTL_S = 30 * 86_400.0


@dataclass(slots=True, frozen=True)
class ResultCaching:
    """An agent's opt-in to the result cache (``Agent.cache``; ``cache`` in a definition).

    A run of the agent that completes successfully stores its end (final output, last agent,
    usage, turns) for ``ttl_s`` seconds, in the store the server keeps its sessions in
    (``agentd.server.cache``); a later run of an *identical request* within the TTL is answered
    from it: it completes at once with ``run_started`` and ``run_completed`` marked ``cached``,
    reads no history, makes no model call and runs no tool. Identical means the same tenant,
    agent and version (and the same definitions of the agents it can hand off to), the same
    input text, input items, context and ``max_turns``. A new version of the agent, or a changed
    definition of any agent it can hand off to, makes new entries: the old ones are never
    served again (they expire).

    The rules, checked for every run (a run they exclude is neither looked up nor stored):

    - never for a run with a session (its answer depends on the conversation, and it must be
      appended to it);
    - never when the agent, or any agent it can hand off to, has a tool that needs the caller:
      a caller-executed tool, a tool needing approval, or an MCP server with
      ``require_approval`` other than "never";
    - never when any of those agents has tools at all (function tools, MCP servers, hosted
      tools), which may have side effects, *unless* ``allow_tools`` is True: the agent's
      owner says its tools (and those of the agents it hands off to) are safe to skip, because
      **a hit does not run them** (a tool that records an order, sends a mail or reads fresh
      data is not called again: the earlier answer is returned);
    - only a run that completes is stored: never a failure, a cancellation or a guardrail
      tripwire. A hit runs no guardrail: the input was checked, and the output passed, when the
      entry was made.

    Requests of different callers of one tenant share entries: an agent whose answer depends on
    who calls (instructions or tools reading the principal) should carry the caller in the
    run's ``context``, or not cache. ``ttl_s``: more than 0, at most 30 days.
    """

    ttl_s: float
    allow_tools: bool = False

    def __post_init__(self) -> None:
        ttl = self.ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"result caching needs a ttl_s of more than 0 seconds, got {ttl!r}")
        if ttl > MAX_RESULT_CACHE_TTL_S:
            raise ValueError(f"result caching ttl_s is at most {MAX_RESULT_CACHE_TTL_S:g} seconds (30 days), got {ttl:g}")
        if not isinstance(self.allow_tools, bool):
            raise ValueError(f"result caching allow_tools is a bool, got {self.allow_tools!r}")


@dataclass(eq=False)
class Agent:
    """An LLM agent.

    ``name`` doubles as its resource id (``agents/{name}``). ``instructions`` may be a
    function of the run context, evaluated at every turn. ``handoffs`` name other agents
    (or are the agents themselves); each becomes a ``transfer_to_<name>`` tool.
    ``model=None`` uses the server's default model.

    ``history_limit`` is the agent's history window: a run started with this agent sends at
    most that many of its session's newest items to the model (None: the server's
    ``AGENTD_HISTORY_MAX_ITEMS``, 200 by default; 0: the whole session, however long). The
    older items stay in the session; the run's ``RunStarted.history_omitted`` counts them.

    ``output_schema`` is a raw JSON schema for the final output (declarative agents), the
    alternative to ``output_type``: the final output must be JSON valid under it.

    ``compaction`` (opt-in) summarises the older items of a long history into one summary
    item with a model call before a run's first turn (see ``Compaction``).

    Guardrails (``runtime.guardrails``): ``input_guardrails`` check the run's input when the
    run starts with this agent (``input_guardrail_mode``: "parallel", concurrently with the
    first model call, or "blocking", before it); ``output_guardrails`` its final output;
    ``tool_guardrails`` the calls of its tools, before they run and on their results. Each
    entry is a guardrail or the name of one in ``App.guardrails``; a tripwire fails the run.

    ``model_api`` picks the wire API of the agent's model on providers that speak several
    (OpenAI): "responses" or "chat_completions" (None: the server's ``AGENTD_MODEL_API``).
    ``hosted_tools`` are tools the model provider runs itself (Responses API only:
    ``{"type": "web_search"}``, ``{"type": "file_search", "vector_store_ids": [...]}``,
    ``{"type": "code_interpreter"}``, ``{"type": "image_generation"}``, options as the API
    takes them); an agent with hosted tools and no ``model_api`` uses the Responses API, and
    one that says "chat_completions" does not load.

    ``mcp_servers`` (``agentd.server.mcp``: ``MCPServerStdio``, ``MCPServerStreamableHttp``):
    MCP servers whose tools are the agent's too, read from the servers' current tool lists at
    every turn (see ``agentd.server.mcp.tools``).

    ``cache`` (opt-in, ``ResultCaching(ttl_s, allow_tools=False)``): identical requests without
    a session are answered from the result cache for ``ttl_s`` seconds, without a model call
    and without running tools; see ``ResultCaching`` for the rules (never with a session, never
    with tools needing the caller, tools only with ``allow_tools``). An agent whose own tools
    break the rules does not load (ValueError).
    """

    name: str
    instructions: Instructions = ""
    description: str = ""
    model: str | None = None
    model_settings: ModelSettings = field(default_factory=ModelSettings)
    tools: list[FunctionTool] = field(default_factory=list)
    handoffs: list[Union["Agent", str]] = field(default_factory=list)
    output_type: type[BaseModel] | None = None
    max_turns: int = 10
    history_limit: int | None = None
    compaction: Compaction | None = None
    output_schema: dict[str, Any] | None = None
    input_guardrails: list[Union[Guardrail, str, Any]] = field(default_factory=list)
    output_guardrails: list[Union[Guardrail, str, Any]] = field(default_factory=list)
    tool_guardrails: list[Union[Guardrail, str, Any]] = field(default_factory=list)
    input_guardrail_mode: InputGuardrailMode = "parallel"
    model_api: str | None = None
    hosted_tools: list[dict[str, Any]] = field(default_factory=list)
    mcp_servers: list[Any] = field(default_factory=list)
    cache: ResultCaching | None = None

    def __post_init__(self) -> None:
        if not AGENT_NAME_RE.match(self.name):
            raise ValueError(f"agent name {self.name!r} must match {AGENT_NAME_RE.pattern} (it is a resource id)")
        if self.max_turns < 1:
            raise ValueError(f"agent {self.name!r}: max_turns must be >= 1")
        if self.input_guardrail_mode not in ("parallel", "blocking"):
            raise ValueError(f"agent {self.name!r}: input_guardrail_mode must be 'parallel' or 'blocking'")
        if self.output_type is not None and self.output_schema is not None:
            raise ValueError(f"agent {self.name!r}: give output_type or output_schema, not both")
        if self.history_limit is not None and self.history_limit < 0:
            raise ValueError(f"agent {self.name!r}: history_limit must be >= 0 (0: the whole session) or None")
        if self.compaction is not None and self.history_limit and self.compaction.trigger_items >= self.history_limit:
            raise ValueError(
                f"agent {self.name!r}: compaction.trigger_items ({self.compaction.trigger_items}) must be below "
                f"history_limit ({self.history_limit}), or the history never grows long enough to compact"
            )
        if self.cache is not None:
            if not isinstance(self.cache, ResultCaching):
                raise ValueError(f"agent {self.name!r}: cache must be a ResultCaching(ttl_s, allow_tools), got {self.cache!r}")
            refusal = self.cache_refusal(self.cache.allow_tools)
            if refusal is not None:
                raise ValueError(f"agent {self.name!r} cannot cache its results: {refusal}")

    def cache_refusal(self, allow_tools: bool) -> str | None:
        """Why this agent's tools keep a run from being cached (``ResultCaching``'s rules), or None."""
        for tool in self.tools:
            if getattr(tool, "caller_executed", False):
                return f"its tool {tool.name!r} is executed by the caller (a run waits for the caller)"
            if getattr(tool, "needs_approval", False):
                return f"its tool {tool.name!r} needs approval (a run waits for the caller)"
        for server in self.mcp_servers:
            if getattr(server, "require_approval", "never") != "never":
                return f"its MCP server {getattr(server, 'name', server)!r} requires approvals (a run waits for the caller)"
        if allow_tools:
            return None
        kinds = [kind for kind, present in (("tools", self.tools), ("MCP servers", self.mcp_servers),
                                            ("hosted tools", self.hosted_tools)) if present]
        if kinds:
            return (f"it has {' and '.join(kinds)}, which may have side effects and a cache hit does not run; "
                    "set allow_tools=True if they are safe to skip")
        return None

    @property
    def handoff_names(self) -> list[str]:
        return [h if isinstance(h, str) else h.name for h in self.handoffs]

    async def resolve_instructions(self, ctx: RunContext) -> str:
        if isinstance(self.instructions, str):
            return self.instructions
        value = self.instructions(ctx, self)
        if inspect.isawaitable(value):
            value = await value
        return str(value)


def handoff_tool_name(agent_name: str) -> str:
    return f"transfer_to_{agent_name.replace('-', '_')}"


@dataclass(slots=True, frozen=True)
class CompiledAgent:
    """An agent with everything a turn needs precomputed, so the loop does no per-turn schema work."""

    agent: Agent
    model: str
    # The wire API of its model calls: the agent's model_api, "responses" when it has hosted
    # tools, else None (the provider's default).
    model_api: str | None
    tools_by_name: dict[str, FunctionTool]
    handoffs_by_tool: dict[str, str]  # transfer_to_x -> agent name
    tool_specs: tuple[ToolSpec, ...]
    output_schema: OutputSchema | None
    input_guardrails: tuple[Guardrail, ...] = ()
    output_guardrails: tuple[Guardrail, ...] = ()
    tool_guardrails: tuple[Guardrail, ...] = ()
    hosted_tools: tuple[dict[str, Any], ...] = ()
    # The tools of its MCP servers (agentd.server.mcp.tools.MCPToolset), resolved per turn.
    mcp: Any = None

    @property
    def name(self) -> str:
        return self.agent.name

    def tool(self, name: str) -> FunctionTool | None:
        """The agent's tool by name: its own, else one of its MCP servers' current tools."""
        tool = self.tools_by_name.get(name)
        if tool is None and self.mcp is not None:
            tool = self.mcp.tool(name)
        return tool

    async def find_tool(self, name: str) -> FunctionTool | None:
        """``tool``, after reading MCP tool lists that are stale or were never read (a resumed run)."""
        if name not in self.tools_by_name and self.mcp is not None:
            await self.mcp.load()
        return self.tool(name)

    def tool_names(self) -> list[str]:
        return [*self.tools_by_name, *(t.name for t in self.mcp.tools())] if self.mcp is not None else list(
            self.tools_by_name
        )

    def current_tools(self) -> list[FunctionTool]:
        """Its own tools, then its MCP servers' tools as last listed (what GetAgent shows)."""
        return [*self.agent.tools, *(self.mcp.tools() if self.mcp is not None else ())]

    async def turn_tool_specs(self) -> tuple[ToolSpec, ...]:
        """The tools a model turn offers: its own and handoffs, then its MCP servers' current ones."""
        if self.mcp is None:
            return self.tool_specs
        return (*self.tool_specs, *await self.mcp.specs())


def compile_agent(
    agent: Agent, agents: dict[str, Agent], default_model: str, guardrails: dict[str, Guardrail] | None = None
) -> CompiledAgent:
    """``guardrails``: the app's named guardrails (``App.guardrails``), which the agent's lists may name."""
    from agentd.server.runtime.errors import AppConfigError

    tools_by_name: dict[str, FunctionTool] = {}
    for tool in agent.tools:
        if not isinstance(tool, FunctionTool):
            raise AppConfigError(f"agent {agent.name!r}: {tool!r} is not a tool; decorate it with @function_tool")
        if tool.name in tools_by_name:
            raise AppConfigError(f"agent {agent.name!r} has two tools named {tool.name!r}")
        tools_by_name[tool.name] = tool
    handoffs_by_tool: dict[str, str] = {}
    specs = [ToolSpec(t.name, t.description, t.parameters, t.strict) for t in tools_by_name.values()]
    for target in agent.handoff_names:
        if target not in agents:
            raise AppConfigError(f"agent {agent.name!r} hands off to unknown agent {target!r}")
        tool_name = handoff_tool_name(target)
        if tool_name in tools_by_name:
            raise AppConfigError(f"agent {agent.name!r}: tool {tool_name!r} collides with its handoff to {target!r}")
        handoffs_by_tool[tool_name] = target
        description = agents[target].description or f"Hand the conversation to the {target} agent."
        specs.append(
            ToolSpec(
                tool_name,
                f"Handoff to the {target} agent. {description}",
                {"type": "object", "properties": {}, "required": [], "additionalProperties": False},
                True,
            )
        )
    output_schema = None
    if agent.output_type is not None:
        schema, strict = strict_json_schema(agent.output_type.model_json_schema())
        output_schema = OutputSchema(name=agent.output_type.__name__, schema=schema, strict=strict)
    elif agent.output_schema is not None:
        schema, strict = strict_schema_for(agent.output_schema)
        # OpenAI's response format names are at most 64 characters.
        output_schema = OutputSchema(name=f"{agent.name[:57]}_output", schema=schema, strict=strict)
    if agent.model_api is not None and agent.model_api not in MODEL_APIS:
        raise AppConfigError(
            f"agent {agent.name!r}: model_api {agent.model_api!r} is not one of {', '.join(MODEL_APIS)} (or None)"
        )
    for index, spec in enumerate(agent.hosted_tools):
        problem = hosted_tool_problem(spec)
        if problem is not None:
            raise AppConfigError(f"agent {agent.name!r}: hosted_tools[{index}]: {problem}")
    if agent.hosted_tools and agent.model_api == "chat_completions":
        kinds = ", ".join(str(spec.get("type")) for spec in agent.hosted_tools)
        raise AppConfigError(
            f"agent {agent.name!r} declares hosted tools ({kinds}), which only the Responses API runs, but its "
            "model_api is 'chat_completions'; use model_api='responses' (or leave it unset) or drop the hosted tools"
        )
    return CompiledAgent(
        agent=agent,
        model=agent.model or default_model,
        model_api=agent.model_api or ("responses" if agent.hosted_tools else None),
        tools_by_name=tools_by_name,
        handoffs_by_tool=handoffs_by_tool,
        tool_specs=tuple(specs),
        output_schema=output_schema,
        input_guardrails=resolve_guardrails(agent, "input", agent.input_guardrails, guardrails or {}),
        output_guardrails=resolve_guardrails(agent, "output", agent.output_guardrails, guardrails or {}),
        tool_guardrails=resolve_guardrails(agent, "tool", agent.tool_guardrails, guardrails or {}),
        hosted_tools=tuple(dict(spec) for spec in agent.hosted_tools),
        mcp=_mcp_toolset(agent, {*tools_by_name, *handoffs_by_tool}, len(specs)),
    )


def _mcp_toolset(agent: Agent, reserved: set[str], own: int) -> Any:
    """The agent's MCP tools (None without MCP servers); ``reserved``: its own tool names."""
    from agentd.server.runtime.errors import AppConfigError

    if not agent.mcp_servers:
        return None
    from agentd.server.mcp.client import MCPServer
    from agentd.server.mcp.tools import MAX_TOOLS_PER_REQUEST, MCPToolset

    names: set[str] = set()
    for server in agent.mcp_servers:
        if not isinstance(server, MCPServer):
            raise AppConfigError(
                f"agent {agent.name!r}: {server!r} is not an MCP server; use agentd.server.mcp.MCPServerStdio "
                "or MCPServerStreamableHttp"
            )
        if server.name in names:
            raise AppConfigError(f"agent {agent.name!r} has two MCP servers named {server.name!r}")
        names.add(server.name)
    return MCPToolset(agent.name, agent.mcp_servers, reserved, MAX_TOOLS_PER_REQUEST - own - len(agent.hosted_tools))

