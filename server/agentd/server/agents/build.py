"""A runtime ``Agent`` from an ``AgentDefinition``.

The definition's references are resolved here: python tools in the app module's tools (by
name) or by import (``module:attribute``, only with ``allow_imports``), python guardrails in
``App.guardrails`` or by import, handoff and classifier targets among ``known_agents``. A
reference that does not resolve is a ``DefinitionError`` naming its field; every problem is
reported at once.

What the runtime agent does with the rest:

- ``instructions`` become ``TemplateInstructions``: rendered from the run's context at every
  turn; a key the context lacks fails the run (``TemplateKeyError`` → ``RunFailed`` naming
  the keys). A template without keys is a plain string.
- caller tools become caller-executed ``FunctionTool``s with the given JSON schema
  (``FunctionTool.caller_executed_from_schema``); python tools are the app's own tool
  objects (a copy when the definition overrides ``needs_approval``).
- ``output_schema`` becomes ``Agent.output_schema``: the final output must be JSON valid
  under it, else the run fails with ``invalid_output``.
- guardrail specs compile with ``runtime.guardrails.compile_guardrail``.
- ``mcp_servers`` become ``agentd.server.mcp`` server objects (stdio ones only with
  ``allow_imports``: a definition from the API cannot start processes).
- ``cache`` becomes ``Agent.cache`` (``ResultCaching``), once the built agent's tools (python
  tools as the app defines them) pass its rules; else a ``DefinitionError`` on ``cache``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping

from agentd.server.agents.definition import (
    AgentDefinition,
    DefinitionError,
    PythonGuardrailSpec,
    PythonTool,
    format_loc,
    reference_violations,
    resolve_python_guardrail,
    resolve_python_tool,
)
from agentd.server.agents.template import Template, parse_template
from agentd.server.models.base import ModelSettings
from agentd.server.runtime.agent import Agent, ResultCaching
from agentd.server.runtime.context import RunContext
from agentd.server.runtime.errors import AgentdError, TemplateKeyError
from agentd.server.runtime.guardrails import Guardrail, compile_guardrail
from agentd.server.runtime.tools import FunctionTool


class TemplateInstructions:
    """An agent's instructions rendered from a template and the run's context (``agents.template``).

    ``keys`` are the context keys it needs: a service may check a request's context against
    them before starting a run; the run itself fails on a missing one with a message naming it.
    """

    def __init__(self, agent: str, template: Template) -> None:
        self.agent = agent
        self.template = template

    @property
    def keys(self) -> tuple[str, ...]:
        return self.template.keys

    def __call__(self, ctx: RunContext, agent: Agent) -> str:
        missing = self.template.missing(ctx.context)
        if missing:
            raise TemplateKeyError(self.agent, missing, sorted(str(k) for k in ctx.context))
        return self.template.render(ctx.context)

    def __repr__(self) -> str:
        return f"TemplateInstructions({self.agent!r}, keys={list(self.keys)!r})"


def agent_from_definition(
    defn: AgentDefinition,
    *,
    app_tools: Mapping[str, FunctionTool],
    known_agents: Collection[str],
    allow_imports: bool = False,
    app_guardrails: Mapping[str, object] | None = None,
    resolve_agent: Callable[[str], Any] | None = None,
    mcp_server: Callable[[Any], Any] | None = None,
) -> Agent:
    """The runtime agent ``defn`` describes; ``DefinitionError`` with every unresolvable reference.

    ``app_tools``: the app module's tools by name (what a python tool's bare ``ref`` names).
    ``known_agents``: every agent name a handoff or classifier guardrail may target (the
    definition's own name counts). ``allow_imports``: whether ``module:attribute`` refs may
    import Python code — True for agent files (the operator's), False (the default) for
    definitions from the API. ``app_guardrails``: ``App.guardrails_by_name``, what a python
    guardrail's bare ``ref`` names. ``resolve_agent``: passed to ``compile_guardrail`` for
    classifier guardrails; by default the classifier keeps the agent's name and the run
    resolves it (so it follows the target's current version). ``mcp_server``: makes the
    ``MCPServer`` of an ``mcp_servers`` entry (``MCPRegistry.server_for``, sharing connections);
    by default each gets one of its own.
    """
    data = defn.model_dump()
    violations = reference_violations(
        data, app_tools=app_tools, known_agents=known_agents, allow_imports=allow_imports,
        app_guardrails=app_guardrails or {},
    )
    if violations:
        raise DefinitionError([(format_loc(loc), message) for loc, message in violations])

    tools: list[FunctionTool] = []
    for spec in defn.tools:
        if isinstance(spec, PythonTool):
            tool = resolve_python_tool(spec.ref, app_tools, allow_imports=allow_imports)
            if spec.needs_approval is not None and spec.needs_approval != tool.needs_approval:
                tool = dataclasses.replace(tool, needs_approval=spec.needs_approval)  # the app's tool stays as it is
        else:
            tool = FunctionTool.caller_executed_from_schema(
                spec.name, spec.description, spec.parameters, needs_approval=spec.needs_approval,
                timeout_s=spec.timeout_s,
            )
        tools.append(tool)

    guardrails: dict[str, list[Guardrail]] = {"input": [], "output": [], "tool": []}
    problems: list[tuple[str, str]] = []
    for stage, specs in (("input", defn.guardrails.input), ("output", defn.guardrails.output),
                         ("tool", defn.guardrails.tool)):
        for index, spec in enumerate(specs):
            registry: Mapping[str, object] = app_guardrails or {}
            if isinstance(spec, PythonGuardrailSpec) and ":" in spec.ref:
                imported = resolve_python_guardrail(spec.ref, registry, stage=stage, allow_imports=allow_imports)
                registry = {**registry, spec.ref: imported}
            try:
                guardrails[stage].append(compile_guardrail(
                    spec, stage=stage, app_guardrails=registry,  # type: ignore[arg-type]
                    resolve_agent=resolve_agent or (lambda name: name),
                ))
            except AgentdError as exc:
                problems.append((f"guardrails.{stage}[{index}]", str(exc)))
    if problems:
        raise DefinitionError(problems)

    mcp_servers: list[Any] = []
    if defn.mcp_servers:
        from agentd.server.mcp.registry import server_from_definition

        mcp_servers = [(mcp_server or server_from_definition)(spec) for spec in defn.mcp_servers]

    template = parse_template(defn.instructions)
    instructions: Any = TemplateInstructions(defn.name, template) if template.keys else template.render({})
    settings = defn.model_settings
    agent = Agent(
        name=defn.name,
        instructions=instructions,
        description=defn.description,
        model=defn.model,
        model_settings=ModelSettings(
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_output_tokens,
            tool_choice=settings.tool_choice,
            parallel_tool_calls=settings.parallel_tool_calls,
            reasoning_effort=settings.reasoning_effort,
            reasoning_summary=settings.reasoning_summary,
        ),
        tools=tools,
        handoffs=list(defn.handoffs),
        output_schema=defn.output_schema,
        max_turns=defn.max_turns,
        history_limit=defn.history_limit,
        model_api=defn.model_api,
        hosted_tools=[spec.model_dump() for spec in defn.hosted_tools],
        mcp_servers=mcp_servers,
        input_guardrails=guardrails["input"],
        output_guardrails=guardrails["output"],
        tool_guardrails=guardrails["tool"],
        input_guardrail_mode=defn.guardrails.input_mode,
    )
    if defn.cache is not None:
        # Checked on the built agent: a python tool's own needs_approval is the app's to say.
        refusal = agent.cache_refusal(defn.cache.allow_tools)
        if refusal is not None:
            raise DefinitionError([("cache", f"the agent cannot cache its results: {refusal}")])
        agent.cache = ResultCaching(defn.cache.ttl_s, defn.cache.allow_tools)
    return agent
