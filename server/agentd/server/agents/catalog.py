"""Every agent a server can run, from every source, by name, version and alias.

Three sources feed the catalog:

- **code**: the app module's agents (``App``), version 0, visible to every tenant;
- **files**: definitions in ``--agents-dir`` (``agents.files``), version 0, visible to
  every tenant unless a definition lists ``tenants``; a file that stops validating keeps
  its previous definition serving;
- **api**: definitions made through ``CreateAgent``/``UpdateAgent``, kept in the
  ``AgentStore`` beside the sessions, owned by the caller's tenant, versioned 1, 2, 3…

A name is unique per tenant across sources: code and file agents are read-only, and an
API agent cannot take the name of one (``names_taken``). Runs pin the exact version they
start with (``RunInput.agent_version``): a run taken over by another replica resumes with
the same version even if the agent changed meanwhile. A handoff goes to the target's
current version.

Replicas see each other's API changes through the store's revision counter, polled every
``poll_interval_s`` (0.5 s): a change on one replica is served by all within a second.
Compiled versions are cached per (tenant, name, version), at most ``cache_size`` of them
(least recently used first out).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agentd.server.agents.build import agent_from_definition
from agentd.server.agents.definition import AgentDefinition, DefinitionError, parse_definition
from agentd.server.agents.store.base import (
    AgentNotFoundError,
    AgentStore,
    AgentVersionNotFoundError,
    AliasRecord,
    AgentVersionRecord,
)
from agentd.server.app import App
from agentd.server.mcp.registry import MCPRegistry
from agentd.server.runtime.agent import Agent, CompiledAgent, compile_agent
from agentd.server.runtime.errors import AgentdError
from agentd.server.runtime.tools import FunctionTool

log = logging.getLogger("agentd.agents")

POLL_INTERVAL_S = 0.5
CACHE_SIZE = 1024


class UnknownAgentError(AgentdError):
    """No agent (or no such version or alias) by that name for the caller."""

    def __init__(self, tenant: str, name: str, what: str = "") -> None:
        super().__init__(what or f"agent {name!r} does not exist")
        self.tenant = tenant
        self.name = name


@dataclass(frozen=True, slots=True)
class AgentEntry:
    """One servable agent version. ``version`` 0: a code or file agent (read-only)."""

    name: str
    version: int
    source: str  # "code" | "file" | "api"
    compiled: CompiledAgent
    definition: dict[str, Any] | None
    tenant: str | None  # the owner (api agents); None: every tenant the definition allows
    create_time: float
    update_time: float

    @property
    def read_only(self) -> bool:
        return self.source != "api"


def session_bucket(session_id: str) -> int:
    """A stable 0..99 bucket per session, so a split alias keeps each session on one version."""
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big") % 100


def pick_route(alias: AliasRecord, session_id: str | None) -> int:
    """The version a split alias sends this session to (sticky per session; random without one)."""
    if len(alias.routes) == 1:
        return alias.routes[0][0]
    bucket = session_bucket(session_id) if session_id else random.randrange(100)
    total = 0
    for version, weight in alias.routes:
        total += weight
        if bucket < total:
            return version
    return alias.routes[-1][0]


class AgentCatalog:
    def __init__(
        self,
        app: App,
        *,
        store: AgentStore | None = None,
        file_definitions: dict[str, AgentDefinition] | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._app = app
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._cache_size = cache_size
        self._tools: dict[str, FunctionTool] = {t.name: t for a in app.compiled.values() for t in a.agent.tools}
        self._guardrails: dict[str, object] = dict(getattr(app, "guardrails_by_name", None) or {})
        self._code = {
            name: AgentEntry(name, 0, "code", compiled, None, None, 0.0, 0.0) for name, compiled in app.compiled.items()
        }
        self._files: dict[str, AgentEntry] = {}
        self._file_definitions: dict[str, AgentDefinition] = {}
        self._latest: dict[tuple[str, str], AgentVersionRecord] = {}  # (tenant, name) -> latest api version
        self._compiled: OrderedDict[tuple[str, str, int], AgentEntry] = OrderedDict()
        # MCP servers: the app module's, and those of file and API agents (shared connections).
        self.mcp = MCPRegistry(getattr(app, "mcp_servers", ()))
        self._revision = -1
        self._poller: asyncio.Task[None] | None = None
        self.set_file_definitions(file_definitions or {})

    @property
    def app_tools(self) -> dict[str, FunctionTool]:
        """The app module's tools by name (what a definition's python tool ``ref`` names)."""
        return self._tools

    @property
    def app_guardrails(self) -> dict[str, object]:
        """The app module's guardrails by name (what a python guardrail ``ref`` names)."""
        return self._guardrails

    @property
    def static_names(self) -> set[str]:
        """The code and file agents' names (what every tenant may hand off to)."""
        return set(self._code) | set(self._files)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.mcp.warm_up()
        if self._store is not None:
            await self.refresh()
            self._poller = asyncio.create_task(self._poll(), name="agentd agent catalog")

    async def stop(self, mcp_grace_s: float = 0.0) -> None:
        """Stop polling the store and close the MCP sessions (``MCPRegistry.aclose``)."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        await self.mcp.aclose(mcp_grace_s)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # a store outage: keep serving what we have, try again
                log.warning("could not refresh the agent catalog from the store", exc_info=True)

    async def refresh(self) -> None:
        """Take in API changes made on any replica since the last refresh."""
        assert self._store is not None
        revision, changed = await self._store.changed_since(max(self._revision, 0))
        if revision == self._revision:
            return
        if changed is None or self._revision < 0:
            names = None  # everything
        else:
            names = set(changed)
        await self._reload(names)
        self._revision = revision

    async def _reload(self, names: set[tuple[str, str]] | None) -> None:
        assert self._store is not None
        if names is None:
            fresh: dict[tuple[str, str], AgentVersionRecord] = {}
            for tenant in await self._store.tenants():
                cursor = ""
                while True:
                    records, cursor = await self._store.list_agents(tenant, 1000, cursor)
                    for record in records:
                        _, latest = await self._store.get_agent(tenant, record.name)
                        fresh[(tenant, record.name)] = latest
                    if not cursor:
                        break
            self._latest = fresh
            return
        for tenant, name in names:
            try:
                _, latest = await self._store.get_agent(tenant, name)
                self._latest[(tenant, name)] = latest
            except AgentNotFoundError:
                self._latest.pop((tenant, name), None)

    # -- files -----------------------------------------------------------------------------

    def set_file_definitions(self, definitions: dict[str, AgentDefinition]) -> list[tuple[str, str]]:
        """Serve these file definitions from now on; a definition that cannot be built keeps
        the previous one (its problems are returned as (agent, message))."""
        problems: list[tuple[str, str]] = []
        entries: dict[str, AgentEntry] = {}
        known = set(self._code) | set(definitions)
        for name, definition in definitions.items():
            if name in self._code:
                problems.append((name, f"agent {name!r} is defined in the app module; a file cannot replace it"))
                continue
            try:
                agent = agent_from_definition(
                    definition, app_tools=self._tools, known_agents=known, allow_imports=True,
                    app_guardrails=self._guardrails, mcp_server=lambda spec: self.mcp.server_for(spec, "files"),
                )
                others = {n: d.description for n, d in definitions.items()}
                compiled = compile_agent(agent, self._compile_view(agent, others), self._app.default_model)
            except (DefinitionError, AgentdError, ValueError) as exc:
                problems.append((name, str(exc)))
                if name in self._files:
                    entries[name] = self._files[name]
                continue
            now = time.time()
            previous = self._files.get(name)
            data = definition.model_dump(mode="json", exclude_none=True)
            created = previous.create_time if previous is not None else now
            entries[name] = AgentEntry(name, 0, "file", compiled, data, None, created, now)
        self._files = entries
        self._file_definitions = dict(definitions)
        return problems

    # -- lookups ---------------------------------------------------------------------------

    def names_taken(self, name: str) -> str | None:
        """The read-only source that owns ``name`` ("code"/"file"), or None."""
        if name in self._code:
            return "code"
        if name in self._files:
            return "file"
        return None

    def list(self, tenant: str) -> list[AgentEntry]:
        """The caller's agents, latest versions, ordered by name."""
        entries = {**self._code}
        entries.update({n: e for n, e in self._files.items() if _visible(e, tenant)})
        for (owner, name), latest in self._latest.items():
            if owner == tenant and name not in entries:
                try:
                    entries[name] = self._entry(latest)
                except (DefinitionError, AgentdError, ValueError):
                    log.warning("agent %s/%s v%d no longer builds", owner, name, latest.version, exc_info=True)
        return [entries[name] for name in sorted(entries)]

    async def resolve(self, tenant: str, ref: str, session_id: str | None = None) -> AgentEntry:
        """``ref``: ``{agent}``, ``{agent}/versions/{n}`` or ``{agent}/aliases/{alias}``."""
        name, _, rest = ref.partition("/")
        if not rest:
            return await self.latest(tenant, name)
        kind, _, value = rest.partition("/")
        if kind == "versions":
            return await self.get(tenant, name, int(value))
        if self._store is None or self.names_taken(name):
            raise UnknownAgentError(tenant, name, f"agent {name!r} has no alias {value!r}")
        try:
            alias = await self._store.get_alias(tenant, name, value)
        except (AgentNotFoundError, AgentVersionNotFoundError, LookupError):
            raise UnknownAgentError(tenant, name, f"agent {name!r} has no alias {value!r}") from None
        return await self.get(tenant, name, pick_route(alias, session_id))

    async def latest(self, tenant: str, name: str) -> AgentEntry:
        entry = self._code.get(name)
        if entry is None:
            entry = self._files.get(name)
            if entry is not None and not _visible(entry, tenant):
                entry = None
        if entry is not None:
            return entry
        latest = self._latest.get((tenant, name))
        if latest is None and self._store is not None:
            try:  # created on another replica since the last poll
                _, latest = await self._store.get_agent(tenant, name)
                self._latest[(tenant, name)] = latest
            except AgentNotFoundError:
                latest = None
        if latest is None:
            raise UnknownAgentError(tenant, name)
        return self._entry(latest)

    async def get(self, tenant: str, name: str, version: int) -> AgentEntry:
        """The exact version (0: the code or file agent)."""
        if version == 0:
            entry = self._code.get(name) or self._files.get(name)
            if entry is None or not _visible(entry, tenant):
                raise UnknownAgentError(tenant, name)
            return entry
        cached = self._compiled.get((tenant, name, version))
        if cached is not None:
            self._compiled.move_to_end((tenant, name, version))
            return cached
        if self._store is None:
            raise UnknownAgentError(tenant, name, f"agent {name!r} has no version {version}")
        try:
            record = await self._store.get_version(tenant, name, version)
        except (AgentNotFoundError, AgentVersionNotFoundError):
            raise UnknownAgentError(tenant, name, f"agent {name!r} has no version {version}") from None
        return self._entry(record)

    def handoff(self, tenant: str, name: str) -> CompiledAgent:
        """A handoff target's current version (handoffs are checked when an agent is built)."""
        entry = self._code.get(name) or self._files.get(name)
        if entry is not None:
            return entry.compiled
        latest = self._latest.get((tenant, name))
        if latest is None:
            raise UnknownAgentError(tenant, name, f"handoff target {name!r} no longer exists")
        return self._entry(latest).compiled

    def _entry(self, record: AgentVersionRecord) -> AgentEntry:
        key = (record.tenant, record.name, record.version)
        cached = self._compiled.get(key)
        if cached is not None:
            self._compiled.move_to_end(key)
            return cached
        definition = parse_definition(record.definition)
        known = self._known_names(record.tenant)
        agent = agent_from_definition(
            definition, app_tools=self._tools, known_agents=known, app_guardrails=self._guardrails,
            mcp_server=lambda spec: self.mcp.server_for(spec, f"tenant:{record.tenant}"),
        )
        compiled = compile_agent(agent, self._compile_view(agent, self._api_descriptions(record.tenant)),
                                 self._app.default_model)
        entry = AgentEntry(
            record.name, record.version, "api", compiled, record.definition, record.tenant, record.create_time,
            record.create_time,
        )
        self._compiled[key] = entry
        while len(self._compiled) > self._cache_size:
            self._compiled.popitem(last=False)
        return entry

    def known_names(self, tenant: str) -> set[str]:
        """Every agent name ``tenant`` may hand off to (code, its visible files, its API agents)."""
        return self._known_names(tenant)

    def _known_names(self, tenant: str) -> set[str]:
        names = set(self._code) | {n for n, e in self._files.items() if _visible(e, tenant)}
        names.update(name for owner, name in self._latest if owner == tenant)
        return names

    def _api_descriptions(self, tenant: str) -> dict[str, str]:
        return {name: str(latest.definition.get("description", ""))
                for (owner, name), latest in self._latest.items() if owner == tenant}

    def _compile_view(self, agent: Agent, others: dict[str, str]) -> dict[str, Agent]:
        """The agents a compile may look handoff targets up in (for their descriptions): code and
        file agents, then ``others`` (name → description) not among them, then ``agent`` itself."""
        agents: dict[str, Agent] = {name: e.compiled.agent for name, e in self._code.items()}
        agents.update({name: e.compiled.agent for name, e in self._files.items()})
        for name, description in others.items():
            agents.setdefault(name, Agent(name=name, description=description))
        agents[agent.name] = agent
        return agents

    def validate_new(self, tenant: str, definition: AgentDefinition) -> None:
        """Build ``definition`` as the store would serve it (DefinitionError when it cannot)."""
        known = self._known_names(tenant) | {definition.name}
        agent = agent_from_definition(
            definition, app_tools=self._tools, known_agents=known, app_guardrails=self._guardrails
        )
        compile_agent(agent, self._compile_view(agent, self._api_descriptions(tenant)), self._app.default_model)


def _visible(entry: AgentEntry, tenant: str) -> bool:
    if entry.definition is None:
        return True
    tenants = entry.definition.get("tenants")
    return tenants is None or tenant in tenants

