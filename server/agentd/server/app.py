"""The app: the set of agents a server hosts, loaded from a module path like ``agentd.examples.support:app``."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from agentd.server.models.script import Script
from agentd.server.runtime.agent import Agent, CompiledAgent, compile_agent
from agentd.server.runtime.errors import AppConfigError
from agentd.server.runtime.guardrails import (
    Guardrail,
    check_classifier_agents,
    guardrail_agents,
    guardrail_registry,
)

DEFAULT_MODEL = "gpt-4o-mini"


@dataclass(eq=False)
class App:
    """Agents to serve.

    ``offline_script`` is what the built-in scripted model plays when no API key is set,
    so the same app runs offline (demos, CI) and against a real model unchanged.

    ``guardrails``: guardrails by name (``runtime.guardrails``), for agents to list by name and
    declarative agent definitions to reference (``{"type": "python", "ref": name}``).
    """

    agents: list[Agent]
    default_model: str = DEFAULT_MODEL
    offline_script: Script | None = None
    guardrails: list = field(default_factory=list)
    compiled: dict[str, CompiledAgent] = field(init=False, repr=False)
    guardrails_by_name: dict[str, Guardrail] = field(init=False, repr=False)  # ``guardrails`` by name

    def __post_init__(self) -> None:
        by_name: dict[str, Agent] = {}
        registry = self.guardrails_by_name = guardrail_registry(self.guardrails)
        for agent in _walk([*self.agents, *guardrail_agents(self.guardrails)]):
            existing = by_name.get(agent.name)
            if existing is not None and existing is not agent:
                raise AppConfigError(f"two different agents are named {agent.name!r}")
            by_name[agent.name] = agent
        if not by_name:
            raise AppConfigError("the app has no agents")
        self.compiled = {
            name: compile_agent(a, by_name, self.default_model, registry) for name, a in by_name.items()
        }
        check_classifier_agents(self.compiled, registry.values())

    def get(self, name: str) -> CompiledAgent | None:
        return self.compiled.get(name)

    @property
    def mcp_servers(self) -> list:
        """The MCP servers of its agents, each once (the server warms them up and closes them)."""
        servers: dict[int, object] = {}
        for compiled in self.compiled.values():
            for server in compiled.agent.mcp_servers:
                servers.setdefault(id(server), server)
        return list(servers.values())


def _walk(agents: Iterable[Agent]) -> Iterable[Agent]:
    """The listed agents and every agent reachable through handoffs (or classifier guardrails) given as objects."""
    seen: set[int] = set()
    stack = list(agents)
    while stack:
        agent = stack.pop(0)
        if id(agent) in seen:
            continue
        seen.add(id(agent))
        yield agent
        stack.extend(h for h in agent.handoffs if isinstance(h, Agent))
        # Classifier guardrails' agents given as objects are served too, like handoff targets.
        stack.extend(guardrail_agents([*agent.input_guardrails, *agent.output_guardrails, *agent.tool_guardrails]))


def load_app(spec: str) -> App:
    """Import ``module:attribute``; the working directory is importable, as with uvicorn."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise AppConfigError(f"app {spec!r} must look like 'package.module:app'")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppConfigError(f"cannot import app module {module_name!r}: {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise AppConfigError(f"{spec!r} is not an agentd App (found {type(app).__name__})")
    return app
