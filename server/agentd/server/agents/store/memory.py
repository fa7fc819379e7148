"""In-process agent store: the reference semantics, for tests and embedded use.

Every method does all its work without awaiting, so on one event loop each call is
atomic without locks. Definitions are normalised through JSON the way a persistent
backend would, so code tested against this store behaves the same on the others.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from agentd.server.agents.store.base import (
    CHANGE_FEED_LIMIT,
    AgentExistsError,
    AgentNotFoundError,
    AgentRecord,
    AgentStore,
    AgentVersionNotFoundError,
    AgentVersionRecord,
    AliasNotFoundError,
    AliasRecord,
    Changes,
    VersionConflictError,
    check_limit,
    check_name,
    check_revision,
    check_routes,
    check_tenant,
    decode_cursor,
    dedupe,
    dump_definition,
    encode_cursor,
    load_definition,
)

__all__ = ["MemoryAgentStore"]


@dataclass(slots=True)
class _Agent:
    create_time: float
    update_time: float
    deleted: bool = False
    # Version N is versions[N - 1]: (definition JSON, create_time, created_by).
    versions: list[tuple[str, float, str]] = field(default_factory=list)
    aliases: dict[str, AliasRecord] = field(default_factory=dict)


class MemoryAgentStore(AgentStore):
    """Agents in plain dicts; lost when the process exits."""

    backend = "memory"

    def __init__(self) -> None:
        self._agents: dict[tuple[str, str], _Agent] = {}
        self._revision = 0
        self._log: deque[tuple[int, str, str]] = deque(maxlen=CHANGE_FEED_LIMIT)

    # --- plumbing -------------------------------------------------------------------

    def _bump(self, tenant: str, name: str) -> None:
        self._revision += 1
        self._log.append((self._revision, tenant, name))

    def _live(self, tenant: str, name: str) -> _Agent:
        check_tenant(tenant)
        agent = self._agents.get((tenant, name))
        if agent is None or agent.deleted:
            raise AgentNotFoundError(tenant, name)
        return agent

    @staticmethod
    def _version(tenant: str, name: str, agent: _Agent, version: int) -> AgentVersionRecord:
        text, create_time, created_by = agent.versions[version - 1]
        return AgentVersionRecord(tenant, name, version, load_definition(text), create_time, created_by)

    @staticmethod
    def _record(tenant: str, name: str, agent: _Agent) -> AgentRecord:
        return AgentRecord(tenant, name, len(agent.versions), agent.create_time, agent.update_time)

    # --- agents and versions ---------------------------------------------------------

    async def create_agent(
        self, tenant: str, name: str, definition: dict[str, Any], created_by: str = ""
    ) -> AgentVersionRecord:
        check_tenant(tenant)
        check_name("an agent name", name)
        text = dump_definition(definition)
        now = time.time()
        agent = self._agents.get((tenant, name))
        if agent is not None and not agent.deleted:
            raise AgentExistsError(tenant, name)
        if agent is None:
            agent = self._agents[(tenant, name)] = _Agent(now, now)
        agent.create_time = agent.update_time = now
        agent.deleted = False
        agent.aliases.clear()
        agent.versions.append((text, now, created_by))
        self._bump(tenant, name)
        return self._version(tenant, name, agent, len(agent.versions))

    async def update_agent(
        self,
        tenant: str,
        name: str,
        definition: dict[str, Any],
        *,
        expected_version: int | None = None,
        created_by: str = "",
    ) -> AgentVersionRecord:
        if expected_version is not None and expected_version < 1:
            raise ValueError(f"expected_version starts at 1, got {expected_version}")
        text = dump_definition(definition)
        agent = self._live(tenant, name)
        if expected_version is not None and expected_version != len(agent.versions):
            raise VersionConflictError(tenant, name, expected_version, len(agent.versions))
        now = time.time()
        agent.versions.append((text, now, created_by))
        agent.update_time = now
        self._bump(tenant, name)
        return self._version(tenant, name, agent, len(agent.versions))

    async def get_agent(self, tenant: str, name: str) -> tuple[AgentRecord, AgentVersionRecord]:
        agent = self._live(tenant, name)
        return self._record(tenant, name, agent), self._version(tenant, name, agent, len(agent.versions))

    async def get_version(self, tenant: str, name: str, version: int) -> AgentVersionRecord:
        check_tenant(tenant)
        agent = self._agents.get((tenant, name))
        if agent is None or not 1 <= version <= len(agent.versions):
            raise AgentVersionNotFoundError(tenant, name, version)
        return self._version(tenant, name, agent, version)

    async def list_agents(self, tenant: str, limit: int, cursor: str = "") -> tuple[list[AgentRecord], str]:
        check_tenant(tenant)
        check_limit(limit)
        after = decode_cursor(cursor)
        names = sorted(n for (t, n), a in self._agents.items() if t == tenant and not a.deleted)
        start = bisect.bisect_right(names, after) if after else 0
        page = names[start : start + limit]
        more = len(names) > start + limit
        records = [self._record(tenant, n, self._agents[(tenant, n)]) for n in page]
        return records, encode_cursor(page[-1]) if more else ""

    async def list_versions(
        self, tenant: str, name: str, limit: int, before_version: int = 0
    ) -> list[AgentVersionRecord]:
        check_limit(limit)
        if before_version < 0:
            raise ValueError(f"before_version must be 0 (from the newest) or a version, got {before_version}")
        agent = self._live(tenant, name)
        top = len(agent.versions) if before_version == 0 else min(before_version - 1, len(agent.versions))
        return [self._version(tenant, name, agent, v) for v in range(top, max(0, top - limit), -1)]

    async def delete_agent(self, tenant: str, name: str) -> None:
        agent = self._live(tenant, name)
        agent.deleted = True
        agent.update_time = time.time()
        agent.aliases.clear()
        self._bump(tenant, name)

    async def tenants(self) -> list[str]:
        return sorted({t for (t, _), a in self._agents.items() if not a.deleted})

    # --- aliases ---------------------------------------------------------------------

    async def set_alias(
        self, tenant: str, agent: str, alias: str, routes: Iterable[Sequence[int]]
    ) -> AliasRecord:
        check_name("an alias name", alias)
        checked = check_routes(routes)
        record = self._live(tenant, agent)
        for version, _ in checked:
            if version > len(record.versions):
                raise AgentVersionNotFoundError(tenant, agent, version)
        result = record.aliases[alias] = AliasRecord(tenant, agent, alias, checked, time.time())
        self._bump(tenant, agent)
        return result

    async def get_alias(self, tenant: str, agent: str, alias: str) -> AliasRecord:
        found = self._live(tenant, agent).aliases.get(alias)
        if found is None:
            raise AliasNotFoundError(tenant, agent, alias)
        return found

    async def list_aliases(self, tenant: str, agent: str) -> list[AliasRecord]:
        aliases = self._live(tenant, agent).aliases
        return [aliases[a] for a in sorted(aliases)]

    async def delete_alias(self, tenant: str, agent: str, alias: str) -> None:
        record = self._live(tenant, agent)
        if record.aliases.pop(alias, None) is None:
            raise AliasNotFoundError(tenant, agent, alias)
        self._bump(tenant, agent)

    # --- change feed -----------------------------------------------------------------

    async def revision(self) -> int:
        return self._revision

    async def changed_since(self, revision: int) -> Changes:
        check_revision(revision)
        current = self._revision
        if revision > current or current - revision > CHANGE_FEED_LIMIT:
            return current, None
        entries = [(t, n) for rev, t, n in self._log if rev > revision]
        if len(entries) != current - revision:  # pragma: no cover - the log keeps LIMIT entries
            return current, None
        return current, dedupe(entries)
